//! `docs/metrics.md` against what an exporter shows: the table parsed ([`parse_doc`]), a
//! Prometheus scrape or EMF documents reduced to names and label keys ([`from_prometheus`],
//! [`from_emf`]), and the comparison both ways ([`compare`]).

use std::collections::{BTreeMap, BTreeSet};

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocMetric {
    /// `kcl_…`.
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
    /// The label keys, sorted.
    pub labels: BTreeSet<String>,
    /// `summary`, `detailed` or `producer`.
    pub level: String,
    /// `None` for `always`; the condition of a `when: …` row.
    pub only_when: Option<String>,
}

/// What an exporter showed: metric name → every set of label keys seen with it.
pub type Seen = BTreeMap<String, BTreeSet<BTreeSet<String>>>;

/// The outcome of a sweep that passed.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Documented metrics of the level found, with their documented labels.
    pub found: Vec<String>,
    /// Documented `when: …` metrics absent, with their condition.
    pub absent_conditional: Vec<(String, String)>,
    /// Documented metrics that do not apply to the level (detailed ones at summary).
    pub other_level: Vec<String>,
}

/// The rows of the metrics table of `docs/metrics.md`.
///
/// ```
/// use kcl_integration_tests::metrics_doc::parse_doc;
/// let doc = parse_doc("| `kcl_x_total` | counter | records | `stream` | summary | always | x |");
/// assert_eq!(doc[0].name, "kcl_x_total");
/// assert!(doc[0].only_when.is_none());
/// ```
///
/// # Panics
/// On a malformed row (a wrong number of cells, an unknown level or appearance).
pub fn parse_doc(md: &str) -> Vec<DocMetric> {
    let mut out = Vec::new();
    for line in md.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let Some(first) = cells.first() else { continue };
        if !(first.starts_with("`kcl_") && first.ends_with('`')) {
            continue;
        }
        assert!(cells.len() >= 7, "malformed row: {line}");
        let ticked = |s: &str| -> BTreeSet<String> {
            s.split(',')
                .map(|l| l.trim().trim_matches('`').to_owned())
                .filter(|l| !l.is_empty() && l != "—")
                .collect()
        };
        let level = cells[4].to_owned();
        assert!(
            ["summary", "detailed", "producer"].contains(&level.as_str()),
            "unknown level in: {line}"
        );
        let only_when = match cells[5] {
            "always" => None,
            w if w.starts_with("when:") => Some(w["when:".len()..].trim().to_owned()),
            other => panic!("unknown appearance {other:?} in: {line}"),
        };
        out.push(DocMetric {
            name: first.trim_matches('`').to_owned(),
            kind: cells[1].to_owned(),
            labels: ticked(cells[3]),
            level,
            only_when,
        });
    }
    out
}

/// Names and label keys of the `kcl_` metrics of a Prometheus text scrape; a histogram's
/// `_sum`, `_count` and `_bucket` series and its `quantile`/`le` label are folded into it.
///
/// ```
/// use kcl_integration_tests::metrics_doc::{from_prometheus, parse_doc};
/// let doc = parse_doc("| `kcl_x_seconds` | histogram | seconds | `stream` | summary | always | x |");
/// let seen = from_prometheus("kcl_x_seconds_count{stream=\"s\"} 2\n", &doc);
/// assert!(seen["kcl_x_seconds"].iter().all(|labels| labels.len() == 1));
/// ```
pub fn from_prometheus(text: &str, doc: &[DocMetric]) -> Seen {
    let histograms: BTreeSet<&str> = doc
        .iter()
        .filter(|m| m.kind == "histogram")
        .map(|m| m.name.as_str())
        .collect();
    let mut seen = Seen::new();
    for line in text.lines() {
        if line.starts_with('#') || !line.starts_with("kcl_") {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let mut name = &line[..end];
        for suffix in ["_sum", "_count", "_bucket"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if histograms.contains(base) {
                    name = base;
                }
            }
        }
        let mut labels = BTreeSet::new();
        if line[end..].starts_with('{') {
            let close = line.rfind('}').unwrap_or(line.len());
            for pair in split_labels(&line[end + 1..close]) {
                if let Some((k, _)) = pair.split_once('=') {
                    if k != "quantile" && k != "le" {
                        labels.insert(k.trim().to_owned());
                    }
                }
            }
        }
        seen.entry(name.to_owned()).or_default().insert(labels);
    }
    seen
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Names and dimension keys of the `kcl_` metrics of CloudWatch EMF documents (one JSON
/// object per line).
///
/// ```
/// let emf = r#"{"_aws":{"CloudWatchMetrics":[{"Dimensions":[["stream"]],"Metrics":[{"Name":"kcl_x_total"}]}]},"stream":"s","kcl_x_total":1}"#;
/// let seen = kcl_integration_tests::metrics_doc::from_emf(emf)?;
/// assert!(seen.contains_key("kcl_x_total"));
/// # Ok::<(), anyhow::Error>(())
/// ```
///
/// # Errors
/// A line that is not an EMF document.
pub fn from_emf(lines: &str) -> anyhow::Result<Seen> {
    let mut seen = Seen::new();
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let doc: serde_json::Value = serde_json::from_str(line)?;
        let directives = doc["_aws"]["CloudWatchMetrics"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("not an EMF document: {line}"))?;
        for d in directives {
            let dims: BTreeSet<String> = d["Dimensions"]
                .as_array()
                .and_then(|sets| sets.first())
                .and_then(|s| s.as_array())
                .map(|s| {
                    s.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for m in d["Metrics"].as_array().into_iter().flatten() {
                let Some(name) = m["Name"].as_str() else {
                    continue;
                };
                if name.starts_with("kcl_") {
                    anyhow::ensure!(
                        !doc[name].is_null(),
                        "EMF document without a value for {name}"
                    );
                    seen.entry(name.to_owned())
                        .or_default()
                        .insert(dims.clone());
                }
            }
        }
    }
    Ok(seen)
}

/// Checks a scrape at `level` (`summary` or `detailed`) against the table, both ways: every
/// documented metric of the level appears with exactly its documented labels (a `when: …`
/// one may be absent, and is listed); no undocumented `kcl_` metric appears, nor a metric of
/// a higher level; at `summary` no series has a `shard` label. `producer` rows apply at
/// every level.
///
/// ```
/// use kcl_integration_tests::metrics_doc::{compare, from_prometheus, parse_doc};
/// let doc = parse_doc("| `kcl_x_total` | counter | records | `stream` | summary | always | x |");
/// let ok = from_prometheus("kcl_x_total{stream=\"s\"} 1\n", &doc);
/// assert!(compare(&doc, &ok, "summary").is_ok());
/// let extra = from_prometheus("kcl_x_total{stream=\"s\"} 1\nkcl_y 1\n", &doc);
/// assert!(compare(&doc, &extra, "summary").is_err());
/// ```
///
/// # Errors
/// Every violation, one per line.
pub fn compare(doc: &[DocMetric], seen: &Seen, level: &str) -> anyhow::Result<Sweep> {
    let applies = |m: &DocMetric| match m.level.as_str() {
        "detailed" => level == "detailed",
        _ => true,
    };
    let mut problems = Vec::new();
    let mut sweep = Sweep::default();
    let documented: BTreeMap<&str, &DocMetric> = doc.iter().map(|m| (m.name.as_str(), m)).collect();
    for m in doc {
        if !applies(m) {
            sweep.other_level.push(m.name.clone());
            continue;
        }
        match (seen.get(&m.name), &m.only_when) {
            (None, None) => problems.push(format!("documented but missing: {}", m.name)),
            (None, Some(when)) => sweep
                .absent_conditional
                .push((m.name.clone(), when.clone())),
            (Some(label_sets), _) => {
                for labels in label_sets {
                    if *labels != m.labels {
                        problems.push(format!(
                            "{} has labels {labels:?}, documented {:?}",
                            m.name, m.labels
                        ));
                    }
                }
                sweep.found.push(m.name.clone());
            }
        }
    }
    for (name, label_sets) in seen {
        match documented.get(name.as_str()) {
            None => problems.push(format!("undocumented: {name}")),
            Some(m) if !applies(m) => problems.push(format!(
                "{name} is documented at {} but seen at {level}",
                m.level
            )),
            Some(_) => {}
        }
        if level == "summary" && label_sets.iter().any(|l| l.contains("shard")) {
            problems.push(format!("{name} has a shard label at the summary level"));
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let accounted = sweep.found.len() + sweep.absent_conditional.len() + sweep.other_level.len();
    anyhow::ensure!(
        accounted == doc.len(),
        "the sweep accounted for {accounted} of {} documented metrics",
        doc.len()
    );
    Ok(sweep)
}

/// `docs/metrics.md` of this workspace.
///
/// ```
/// let doc = kcl_integration_tests::metrics_doc::doc_table();
/// assert!(doc.iter().any(|m| m.name == "kcl_records_processed_total"));
/// ```
///
/// # Panics
/// If it cannot be read.
pub fn doc_table() -> Vec<DocMetric> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let md = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_doc(&md)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
| metric | type | unit | labels | level | appears | what |
|---|---|---|---|---|---|---|
| `kcl_a_total` | counter | records | `stream` | summary | always | a |
| `kcl_b_seconds` | histogram | seconds | `stream` | summary | always | b |
| `kcl_c_total` | counter | writes | `op` | summary | when: rare | c |
| `kcl_shard_d` | gauge | ms | `stream`, `shard` | detailed | always | d |
";

    const SCRAPE: &str = "\
# TYPE kcl_a_total counter
kcl_a_total{stream=\"s\"} 3
kcl_b_seconds{stream=\"s\",quantile=\"0.5\"} 0.1
kcl_b_seconds_sum{stream=\"s\"} 0.2
kcl_b_seconds_count{stream=\"s\"} 2
";

    #[test]
    fn a_complete_scrape_passes() {
        let doc = parse_doc(DOC);
        assert_eq!(doc.len(), 4);
        let sweep = compare(&doc, &from_prometheus(SCRAPE, &doc), "summary").unwrap();
        assert_eq!(sweep.found, ["kcl_a_total", "kcl_b_seconds"]);
        assert_eq!(sweep.absent_conditional.len(), 1);
        assert_eq!(sweep.other_level, ["kcl_shard_d"]);
    }

    #[test]
    fn a_documented_metric_missing_fails() {
        let doc = parse_doc(DOC);
        let scrape = SCRAPE.replace("kcl_a_total{stream=\"s\"} 3\n", "");
        let e = compare(&doc, &from_prometheus(&scrape, &doc), "summary").unwrap_err();
        assert!(
            e.to_string()
                .contains("documented but missing: kcl_a_total"),
            "{e}"
        );
    }

    #[test]
    fn an_undocumented_metric_fails() {
        let doc = parse_doc(DOC);
        let scrape = format!("{SCRAPE}kcl_new_total{{stream=\"s\"}} 1\n");
        let e = compare(&doc, &from_prometheus(&scrape, &doc), "summary").unwrap_err();
        assert!(e.to_string().contains("undocumented: kcl_new_total"), "{e}");
    }

    #[test]
    fn wrong_labels_and_shard_series_at_summary_fail() {
        let doc = parse_doc(DOC);
        let scrape = format!("{SCRAPE}kcl_shard_d{{stream=\"s\",shard=\"x\"}} 1\n");
        let e = compare(&doc, &from_prometheus(&scrape, &doc), "summary").unwrap_err();
        assert!(
            e.to_string()
                .contains("kcl_shard_d is documented at detailed"),
            "{e}"
        );
        assert!(
            e.to_string().contains("shard label at the summary level"),
            "{e}"
        );
        let scrape = SCRAPE.replace(
            "kcl_a_total{stream=\"s\"}",
            "kcl_a_total{stream=\"s\",x=\"1\"}",
        );
        let e = compare(&doc, &from_prometheus(&scrape, &doc), "summary").unwrap_err();
        assert!(e.to_string().contains("kcl_a_total has labels"), "{e}");
    }

    #[test]
    fn emf_documents_are_read() {
        let doc = parse_doc(DOC);
        let emf = r#"{"_aws":{"Timestamp":1,"CloudWatchMetrics":[{"Namespace":"n","Dimensions":[["stream"]],"Metrics":[{"Name":"kcl_a_total"},{"Name":"kcl_b_seconds","Unit":"Seconds"}]}]},"stream":"s","kcl_a_total":3,"kcl_b_seconds":[0.1]}"#;
        let seen = from_emf(emf).unwrap();
        let e = compare(&doc, &seen, "summary").unwrap();
        assert_eq!(e.found, ["kcl_a_total", "kcl_b_seconds"]);
        let missing = emf.replace(r#",{"Name":"kcl_b_seconds","Unit":"Seconds"}"#, "");
        let e = compare(&doc, &from_emf(&missing).unwrap(), "summary").unwrap_err();
        assert!(e.to_string().contains("missing: kcl_b_seconds"), "{e}");
    }

    #[test]
    fn the_real_table_parses() {
        let doc = doc_table();
        assert!(doc.len() >= 40, "{}", doc.len());
        let names: BTreeSet<_> = doc.iter().map(|m| &m.name).collect();
        assert_eq!(names.len(), doc.len(), "a metric documented twice");
        for m in &doc {
            assert!(
                m.labels.contains("shard") == (m.level == "detailed"),
                "{m:?}"
            );
        }
    }
}
