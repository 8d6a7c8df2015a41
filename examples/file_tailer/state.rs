//! The state file: which file, and the offset just past the last line Kinesis acknowledged.
//!
//! A few `key=value` lines, so that an operator can read (and, carefully, edit) it:
//!
//! ```text
//! # file_tailer state: offset is just past the last line Kinesis acknowledged
//! name=/var/log/app.log
//! dev=2049
//! ino=1835017
//! offset=52873
//! head_len=1024
//! head_hash=5f1bb6c3e0a4d2b9
//! ```
//!
//! `name` is informational (the file may have been renamed since); `dev` and `ino` identify
//! the file, `head_len`/`head_hash` fingerprint its first bytes (see
//! [`Fingerprint`](super::follow::Fingerprint)). It is replaced atomically: written to
//! `STATE.tmp`, fsynced, renamed over `STATE`, and the directory fsynced; a crash leaves the old
//! or the new state, never a torn one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::follow::{FileId, Fingerprint};

/// What the state file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// The name the file was read under (informational).
    pub name: PathBuf,
    /// Its identity.
    pub id: FileId,
    /// The offset just past the last acknowledged line.
    pub offset: u64,
    /// Its first bytes' fingerprint (covering at most `offset` bytes).
    pub head: Fingerprint,
}

impl Saved {
    /// The file's text.
    pub fn encode(&self) -> String {
        // A name with a newline would break the format: it is only informational.
        let name = self.name.to_string_lossy().replace(['\n', '\r'], "?");
        format!(
            "# file_tailer state: offset is just past the last line Kinesis acknowledged\n\
             name={name}\ndev={}\nino={}\noffset={}\nhead_len={}\nhead_hash={:016x}\n",
            self.id.dev, self.id.ino, self.offset, self.head.len, self.head.hash
        )
    }

    /// Parses the file's text.
    ///
    /// # Errors
    /// A missing or malformed field.
    pub fn decode(text: &str) -> anyhow::Result<Self> {
        let mut name = None;
        let (mut dev, mut ino, mut offset, mut head_len, mut head_hash) =
            (None, None, None, None, None);
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                bail!("not key=value: {line:?}");
            };
            let int = |v: &str| {
                v.parse::<u64>()
                    .with_context(|| format!("{key}={v:?} is not a number"))
            };
            match key {
                "name" => name = Some(PathBuf::from(value)),
                "dev" => dev = Some(int(value)?),
                "ino" => ino = Some(int(value)?),
                "offset" => offset = Some(int(value)?),
                "head_len" => head_len = Some(int(value)?),
                "head_hash" => {
                    head_hash = Some(
                        u64::from_str_radix(value, 16)
                            .with_context(|| format!("head_hash={value:?} is not hexadecimal"))?,
                    );
                }
                _ => {} // unknown keys: a later version's
            }
        }
        let missing = |k: &str| format!("no {k}= line");
        Ok(Self {
            name: name.unwrap_or_default(),
            id: FileId {
                dev: dev.with_context(|| missing("dev"))?,
                ino: ino.with_context(|| missing("ino"))?,
            },
            offset: offset.with_context(|| missing("offset"))?,
            head: Fingerprint {
                len: head_len.unwrap_or(0),
                hash: head_hash.unwrap_or(Fingerprint::of(b"").hash),
            },
        })
    }

    /// Reads the state file; `None` if there is none.
    ///
    /// # Errors
    /// It cannot be read or parsed (never ignored: starting over could resend or skip a
    /// whole file).
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::decode(&text)
                .map(Some)
                .with_context(|| format!("the state file {} is malformed", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading the state file {}", path.display())),
        }
    }

    /// Replaces the state file atomically (temporary file, fsync, rename, fsync of the
    /// directory).
    ///
    /// # Errors
    /// Any I/O error; the previous state file is then left as it was.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(self.encode().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> Saved {
        Saved {
            name: PathBuf::from("/var/log/app.log"),
            id: FileId { dev: 2049, ino: 7 },
            offset: 52_873,
            head: Fingerprint::of(b"2024-01-01 first line\n"),
        }
    }

    #[test]
    fn round_trips() {
        let s = saved();
        let text = s.encode();
        assert!(text.contains("\noffset=52873\n"), "{text}");
        assert_eq!(Saved::decode(&text).expect("parses"), s);
    }

    #[test]
    fn rejects_missing_and_malformed_fields() {
        assert!(Saved::decode("dev=1\nino=2\n").is_err());
        assert!(Saved::decode("dev=1\nino=2\noffset=x\n").is_err());
        assert!(Saved::decode("dev=1\nino=2\noffset=3\nhead_hash=zz\n").is_err());
        assert!(Saved::decode("garbage").is_err());
        let minimal = Saved::decode("dev=1\nino=2\noffset=3\nfuture=1\n").expect("parses");
        assert_eq!(minimal.head, Fingerprint::of(b""));
    }

    #[test]
    fn stores_atomically_and_loads() {
        let dir = std::env::temp_dir().join(format!("file-tailer-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state");
        let _ = std::fs::remove_file(&path);
        assert_eq!(Saved::load(&path).expect("no file"), None);
        let mut s = saved();
        s.store(&path).expect("store");
        s.offset = 60_000;
        s.store(&path).expect("store again");
        assert_eq!(Saved::load(&path).expect("loads"), Some(s));
        assert!(!dir.join("state.tmp").exists());
        std::fs::write(&path, "dev=1\n").expect("write");
        assert!(Saved::load(&path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
