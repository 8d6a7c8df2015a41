//! What every admin command shares: tables that fit 80 columns, JSON on stdout, progress on
//! stderr, and confirmation prompts.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use anyhow::{bail, Context};

/// The width human tables fit in.
pub(crate) const WIDTH: usize = 80;

/// A column: its header and whether its cells may be shortened (ids, sequence numbers) to fit.
pub(crate) struct Column {
    header: &'static str,
    elide: bool,
}

/// A column that is never shortened (states, counts).
pub(crate) const fn fixed(header: &'static str) -> Column {
    Column {
        header,
        elide: false,
    }
}

/// A column whose cells are shortened in the middle (`shardId-0…00012`) when the table is too
/// wide.
pub(crate) const fn elided(header: &'static str) -> Column {
    Column {
        header,
        elide: true,
    }
}

/// Shortens `s` to `width` characters, keeping its start and (the longer) end, which tell ids
/// and sequence numbers apart: `shardId-000000000012` → `sha…000000012`.
pub(crate) fn elide(s: &str, width: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= width {
        return s.to_owned();
    }
    if width <= 1 {
        return "…".chars().take(width).collect();
    }
    let keep = width - 1;
    let head = keep / 3;
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// Renders `rows` under `columns`, two spaces apart, in at most `width` columns: the elidable
/// columns are narrowed (the widest first, to no less than their header or 6 characters) until
/// the table fits.
pub(crate) fn render(columns: &[Column], rows: &[Vec<String>], width: usize) -> String {
    let n = columns.len();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.header.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * n.saturating_sub(1);
    let floor = |i: usize| columns[i].header.chars().count().max(6);
    while total(&widths) > width {
        let widest = (0..n)
            .filter(|&i| columns[i].elide && widths[i] > floor(i))
            .max_by_key(|&i| widths[i]);
        match widest {
            Some(i) => widths[i] -= 1,
            None => break,
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let c = elide(c, widths[i]);
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(columns.iter().map(|c| c.header.to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

/// Prints a table on stdout.
pub(crate) fn print_table(columns: &[Column], rows: &[Vec<String>]) {
    print!("{}", render(columns, rows, WIDTH));
}

/// Prints `value` on stdout as pretty JSON.
pub(crate) fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A progress line on stderr (never fails: a closed stderr only loses the line).
pub(crate) fn progress(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Asks `question` on stderr and reads the answer from stdin: true for `y`/`yes`. With `yes`
/// (`--yes`) it does not ask. Refuses to ask when stdin is not a terminal.
pub(crate) fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "stdin is not a terminal, so there is nobody to confirm: pass --yes to go ahead \
             without a prompt (or --dry-run to see the plan only, where there is one)"
        );
    }
    let mut err = std::io::stderr();
    let _ = write!(err, "{question} [y/N] ");
    let _ = err.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer from stdin")?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// A time as RFC 3339 (UTC, milliseconds).
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elision_keeps_both_ends() {
        #[rustfmt::skip]
        let table = [
            ("shardId-000000000012", 20, "shardId-000000000012"),
            ("shardId-000000000012", 13, "shar…00000012"),
            ("abcdef", 1, "…"),
            ("abcdef", 0, ""),
            ("ünïcödé-worker", 7, "ün…rker"),
        ];
        for (s, w, want) in table {
            assert_eq!(elide(s, w), want, "{s} in {w}");
            assert!(elide(s, w).chars().count() <= w);
        }
    }

    #[test]
    fn tables_fit_80_columns() {
        let columns = [
            elided("LEASE"),
            elided("OWNER"),
            fixed("COUNTER"),
            elided("CHECKPOINT"),
        ];
        let long = vec![
            "shardId-000000000001".to_owned(),
            "ip-10-0-0-1.eu-west-1.compute.internal-1a2b3c4d".to_owned(),
            "123456".to_owned(),
            "49654263189467376185563153461285718385384957281203781634".to_owned(),
        ];
        let short = vec![
            "s-1".to_owned(),
            "w1".to_owned(),
            "7".to_owned(),
            "LATEST".to_owned(),
        ];
        let out = render(&columns, &[long, short.clone()], WIDTH);
        for l in out.lines() {
            assert!(
                l.chars().count() <= WIDTH,
                "{l:?} is {} wide",
                l.chars().count()
            );
        }
        assert!(out.contains("123456"), "a fixed column is never cut: {out}");
        assert!(
            out.contains("…957281203781634"),
            "the end of a sequence number is kept: {out}"
        );
        // A narrow table is left as it is.
        let out = render(&columns, &[short], WIDTH);
        assert_eq!(
            out,
            "LEASE  OWNER  COUNTER  CHECKPOINT\ns-1    w1     7        LATEST\n"
        );
    }
}
