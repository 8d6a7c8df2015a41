//! Following one file: its identity, reading it into whole lines, and the pure decisions
//! (same file, truncated, rotated; where to resume after a restart).

use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// How many first bytes of a file its fingerprint covers.
pub const HEAD_LEN: usize = 1024;
/// How much one read takes.
const CHUNK: usize = 64 * 1024;
/// The most bytes of one line kept in memory: a longer line cannot be a Kinesis record anyway
/// (data plus partition key at most 1 MiB), so only its length is counted beyond this.
pub const MAX_LINE_BYTES: usize = kcl::producer::MAX_RECORD_BYTES;

/// What names a file on a Unix system: device and inode. A rename keeps it; a new file at the
/// same path has another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

/// FNV-1a, 64 bits: the same in every build and version (std's hasher promises no such thing),
/// so it can be saved in the state file.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The hash of a file's first `len` bytes: tells a file from another that got the same inode
/// after the first was deleted, and a file from its own truncated and rewritten self.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// How many first bytes (at most [`HEAD_LEN`]).
    pub len: u64,
    /// Their [`fnv1a`].
    pub hash: u64,
}

impl Fingerprint {
    /// The fingerprint of `head` (the file's first bytes).
    pub fn of(head: &[u8]) -> Self {
        Self {
            len: head.len() as u64,
            hash: fnv1a(head),
        }
    }

    /// Whether `file` starts with the bytes fingerprinted (false if it is shorter).
    pub fn matches(&self, file: &File) -> io::Result<bool> {
        let mut head = vec![0; self.len as usize];
        match file.read_exact_at(&mut head, 0) {
            Ok(()) => Ok(fnv1a(&head) == self.hash),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// One line of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Its bytes, without the `\n`; only the first [`MAX_LINE_BYTES`] if it is longer.
    pub data: Bytes,
    /// The offset of its first byte.
    pub offset: u64,
    /// Its length without the `\n`.
    pub len: u64,
}

impl Line {
    /// Whether `data` holds only the beginning of the line (it is too long for Kinesis).
    pub fn is_cut(&self) -> bool {
        self.len > self.data.len() as u64
    }

    /// The offset just past its `\n`.
    pub fn end(&self) -> u64 {
        self.offset + self.len + 1
    }
}

/// Turns the bytes of a file, read in any pieces, into whole lines with their offsets; what
/// follows the last `\n` waits for more.
#[derive(Debug)]
pub struct LineSplitter {
    /// The offset just past the last whole line.
    start: u64,
    /// The beginning of the unterminated line (at most [`MAX_LINE_BYTES`]).
    partial: Vec<u8>,
    /// Its full length so far.
    partial_len: u64,
}

impl LineSplitter {
    /// A splitter fed from `start` on (a line boundary).
    pub fn new(start: u64) -> Self {
        Self {
            start,
            partial: Vec::new(),
            partial_len: 0,
        }
    }

    /// The offset just past the last whole line: where to resume after a restart.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The offset of the next byte to feed.
    pub fn read_pos(&self) -> u64 {
        self.start + self.partial_len
    }

    /// Feeds the next bytes; whole lines go to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Line>) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.keep(&bytes[..i]);
            out.push(Line {
                data: Bytes::from(std::mem::take(&mut self.partial)),
                offset: self.start,
                len: self.partial_len,
            });
            self.start += self.partial_len + 1;
            self.partial_len = 0;
            bytes = &bytes[i + 1..];
        }
        self.keep(bytes);
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = MAX_LINE_BYTES.saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.partial_len += bytes.len() as u64;
    }

    /// Takes the unterminated line, if any: the splitter then stands past it (for a file left
    /// for good, whose last line will never get its `\n`).
    pub fn take_unterminated(&mut self) -> Option<Line> {
        if self.partial_len == 0 {
            return None;
        }
        let line = Line {
            data: Bytes::from(std::mem::take(&mut self.partial)),
            offset: self.start,
            len: self.partial_len,
        };
        self.start += self.partial_len;
        self.partial_len = 0;
        Some(line)
    }
}

/// An open file being read, by its descriptor: a rename does not disturb it.
#[derive(Debug)]
pub struct Tailed {
    file: File,
    /// Its identity.
    pub id: FileId,
    /// The name it was opened by (for the logs and the state file).
    pub name: PathBuf,
    /// Its lines, from where reading started.
    pub lines: LineSplitter,
    /// The offset just past the last line handed over (put into the producer, or refused):
    /// what the state file may say once the producer acknowledged everything put. Behind
    /// `lines.start()` while a batch that was read is being handed over.
    pub done: u64,
    /// Its first bytes as read (up to [`HEAD_LEN`]): truncation detection and the fingerprint.
    head: Vec<u8>,
    /// Set once the path was seen naming another file: read to the end, then leave it.
    pub rotated: bool,
}

impl Tailed {
    /// Follows `file` (opened as `name`) from `offset`, which must be a line boundary.
    pub fn new(file: File, name: &Path, offset: u64) -> io::Result<Self> {
        let id = FileId::of(&file.metadata()?);
        let mut head = vec![0; offset.min(HEAD_LEN as u64) as usize];
        let got = read_at_most(&file, &mut head, 0)?;
        head.truncate(got);
        Ok(Self {
            file,
            id,
            name: name.to_owned(),
            lines: LineSplitter::new(offset),
            done: offset,
            head,
            rotated: false,
        })
    }

    /// The file's current size.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Reads on from the read position until the end of the file or until about `max_lines`
    /// lines or `max_bytes` bytes were read; whole lines go to `out`. Returns the bytes read
    /// and whether the end of the file was reached.
    pub fn read(
        &mut self,
        max_lines: usize,
        max_bytes: usize,
        out: &mut Vec<Line>,
    ) -> io::Result<(usize, bool)> {
        let mut buf = vec![0; CHUNK];
        let mut total = 0;
        while out.len() < max_lines && total < max_bytes {
            let pos = self.lines.read_pos();
            let n = match self.file.read_at(&mut buf, pos) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok((total, true));
            }
            if pos < HEAD_LEN as u64 && self.head.len() as u64 == pos {
                let take = n.min(HEAD_LEN - self.head.len());
                self.head.extend_from_slice(&buf[..take]);
            }
            self.lines.push(&buf[..n], out);
            total += n;
        }
        Ok((total, false))
    }

    /// Whether the file still starts with the bytes read from it (false after a truncation,
    /// even one followed by more writes than had been read).
    pub fn head_unchanged(&self) -> io::Result<bool> {
        let mut now = vec![0; self.head.len()];
        let got = read_at_most(&self.file, &mut now, 0)?;
        Ok(got == now.len() && now == self.head)
    }

    /// The fingerprint to save with offset `upto` (≤ the read position).
    pub fn fingerprint(&self, upto: u64) -> Fingerprint {
        let len = (upto.min(HEAD_LEN as u64) as usize).min(self.head.len());
        Fingerprint::of(&self.head[..len])
    }

    /// Reads the file again from its start (after a truncation). The unterminated line, if
    /// any, must have been taken first.
    pub fn restart(&mut self) {
        self.lines = LineSplitter::new(0);
        self.done = 0;
        self.head.clear();
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns the bytes read.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The offset just past the last `\n` before `len` (0 if there is none): where a tailer that
/// starts at the end of a file begins, so that the line being written is sent whole.
pub fn start_of_last_line(file: &File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0; CHUNK];
    while end > 0 {
        let start = end.saturating_sub(CHUNK as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// What a look at the followed file and at the path found, at the end of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The path still names the file, which did not shrink: wait for more.
    Same,
    /// The file is shorter than what was read, or its first bytes changed (copytruncate):
    /// read it again from the start.
    Truncated,
    /// The path names another file now (rotation): finish this one, then follow the new one.
    Rotated,
    /// Nothing at the path (renamed, not yet replaced): keep reading the open file.
    PathMissing,
}

/// Decides what happened to the followed file `followed`, read up to `read_pos`, now `len`
/// bytes long and starting (`head_unchanged`) or not with the bytes read; `at_path` is the
/// identity of what the path names now. Rotation wins over truncation: a file rotated away
/// is only read to its end.
pub fn classify(
    followed: FileId,
    read_pos: u64,
    len: u64,
    head_unchanged: bool,
    at_path: Option<FileId>,
) -> Change {
    match at_path {
        Some(id) if id != followed => Change::Rotated,
        _ if len < read_pos || !head_unchanged => Change::Truncated,
        None => Change::PathMissing,
        Some(_) => Change::Same,
    }
}

/// Where to start on a file that has the saved identity, after a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// At the saved offset: it is still the same content.
    At(u64),
    /// At 0, for the reason given: the file was truncated (or its inode reused) meanwhile.
    FromStart(&'static str),
}

/// Decides where to resume on the file with the saved identity, now `len` bytes long,
/// starting (`head_matches`) or not with the saved fingerprint's bytes.
pub fn resume(saved_offset: u64, len: u64, head_matches: bool) -> Resume {
    if len < saved_offset {
        Resume::FromStart("it is shorter than the saved offset (truncated while stopped)")
    } else if !head_matches {
        Resume::FromStart(
            "its first bytes changed (truncated and rewritten while stopped, or another file \
             got its inode)",
        )
    } else {
        Resume::At(saved_offset)
    }
}

/// The files in `dir` whose identity is `id` (a rotated file is usually renamed next to the
/// original: `app.log.1`), other than `except`.
pub fn find_by_id(dir: &Path, id: FileId, except: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path == except {
            continue;
        }
        // Follows symbolic links, as opening the path does.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() && FileId::of(&meta) == id {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines(s: &LineSplitter, input: &[&[u8]]) -> (Vec<(String, u64, u64)>, u64, u64) {
        let mut s = LineSplitter::new(s.start());
        let mut out = Vec::new();
        for piece in input {
            s.push(piece, &mut out);
        }
        let got = out
            .iter()
            .map(|l| {
                (
                    String::from_utf8_lossy(&l.data).into_owned(),
                    l.offset,
                    l.len,
                )
            })
            .collect();
        (got, s.start(), s.read_pos())
    }

    #[test]
    fn splits_whole_lines_across_pieces() {
        let (got, start, pos) = lines(&LineSplitter::new(10), &[b"ab\ncd", b"e\n\nf", b"gh"]);
        assert_eq!(
            got,
            [
                ("ab".into(), 10, 2),
                ("cde".into(), 13, 3),
                (String::new(), 17, 0)
            ]
        );
        // "fgh" waits for its newline.
        assert_eq!((start, pos), (18, 21));
    }

    #[test]
    fn keeps_only_the_beginning_of_an_oversized_line() {
        let mut s = LineSplitter::new(0);
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_LINE_BYTES + 10];
        s.push(&big[..1000], &mut out);
        s.push(&big[1000..], &mut out);
        s.push(b"\nok\n", &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[0].is_cut());
        assert_eq!(out[0].data.len(), MAX_LINE_BYTES);
        assert_eq!(out[0].len, (MAX_LINE_BYTES + 10) as u64);
        assert_eq!(
            (&out[1].data[..], out[1].offset),
            (&b"ok"[..], MAX_LINE_BYTES as u64 + 11)
        );
        assert!(!out[1].is_cut());
    }

    #[test]
    fn takes_the_unterminated_line() {
        let mut s = LineSplitter::new(0);
        let mut out = Vec::new();
        s.push(b"a\nbc", &mut out);
        let tail = s.take_unterminated().expect("a partial line");
        assert_eq!((&tail.data[..], tail.offset, tail.len), (&b"bc"[..], 2, 2));
        assert_eq!((s.start(), s.read_pos()), (4, 4));
        assert_eq!(s.take_unterminated(), None);
    }

    const A: FileId = FileId { dev: 1, ino: 10 };
    const B: FileId = FileId { dev: 1, ino: 11 };

    #[test]
    fn classifies_changes() {
        assert_eq!(classify(A, 100, 100, true, Some(A)), Change::Same);
        assert_eq!(classify(A, 100, 150, true, Some(A)), Change::Same);
        assert_eq!(classify(A, 100, 50, true, Some(A)), Change::Truncated);
        // Truncated, then written past the read position: the head tells.
        assert_eq!(classify(A, 100, 150, false, Some(A)), Change::Truncated);
        assert_eq!(classify(A, 100, 100, true, Some(B)), Change::Rotated);
        // Rotated wins: the old file is only read to its end.
        assert_eq!(classify(A, 100, 0, false, Some(B)), Change::Rotated);
        assert_eq!(classify(A, 100, 100, true, None), Change::PathMissing);
        assert_eq!(classify(A, 100, 10, true, None), Change::Truncated);
        // Same inode number on another device: another file.
        let other_dev = FileId { dev: 2, ino: 10 };
        assert_eq!(classify(A, 0, 0, true, Some(other_dev)), Change::Rotated);
    }

    #[test]
    fn resume_decisions() {
        assert_eq!(resume(100, 100, true), Resume::At(100));
        assert_eq!(resume(100, 5000, true), Resume::At(100));
        assert!(matches!(resume(100, 99, true), Resume::FromStart(_)));
        assert!(matches!(resume(100, 5000, false), Resume::FromStart(_)));
        assert_eq!(resume(0, 0, true), Resume::At(0));
    }

    #[test]
    fn fnv_is_stable() {
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    fn temp_file(name: &str, content: &[u8]) -> (PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("file-tailer-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        let mut f = File::create(&path).expect("create");
        f.write_all(content).expect("write");
        (path.clone(), File::open(&path).expect("open"))
    }

    #[test]
    fn starts_after_the_last_newline() {
        let (path_a, f) = temp_file("last-line", b"one\ntwo\nthr");
        assert_eq!(start_of_last_line(&f, 11).expect("read"), 8);
        assert_eq!(start_of_last_line(&f, 8).expect("read"), 8);
        assert_eq!(start_of_last_line(&f, 3).expect("read"), 0);
        let mut long = vec![b'y'; 3 * CHUNK];
        long[5] = b'\n';
        let (path_b, f) = temp_file("long-last-line", &long);
        assert_eq!(start_of_last_line(&f, long.len() as u64).expect("read"), 6);
        for p in [path_a, path_b] {
            std::fs::remove_dir_all(p.parent().expect("dir")).ok();
        }
    }

    #[test]
    fn reads_lines_and_sees_truncation_and_fingerprints() {
        let (path, _) = temp_file("tailed", b"first line\nsecond line\npart");
        let mut t = Tailed::new(File::open(&path).expect("open"), &path, 0).expect("tailed");
        let mut out = Vec::new();
        let (n, eof) = t.read(100, 1 << 20, &mut out).expect("read");
        assert_eq!((n, eof, out.len()), (27, true, 2));
        assert_eq!(t.lines.start(), 23);
        assert_eq!((out[0].end(), out[1].end(), t.done), (11, 23, 0));
        assert!(t.head_unchanged().expect("head"));
        let fp = t.fingerprint(t.lines.start());
        assert_eq!(fp, Fingerprint::of(b"first line\nsecond line\n"));
        assert!(fp.matches(&File::open(&path).expect("open")).expect("fp"));
        // Resuming at a saved offset reads the head for the fingerprint.
        let again = Tailed::new(File::open(&path).expect("open"), &path, 23).expect("tailed");
        assert_eq!(again.fingerprint(23), fp);
        // copytruncate, then more written than had been read.
        std::fs::write(&path, b"a whole new content, longer than before\n").expect("rewrite");
        assert!(!t.head_unchanged().expect("head"));
        assert!(!fp.matches(&File::open(&path).expect("open")).expect("fp"));
        assert_eq!(t.lines.take_unterminated().map(|l| l.len), Some(4));
        t.restart();
        out.clear();
        t.read(100, 1 << 20, &mut out).expect("read");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].offset, 0);
        let found =
            find_by_id(path.parent().expect("dir"), t.id, Path::new("/nonexistent")).expect("scan");
        assert_eq!(found, std::slice::from_ref(&path));
        assert!(find_by_id(path.parent().expect("dir"), t.id, &path)
            .expect("scan")
            .is_empty());
        std::fs::remove_dir_all(path.parent().expect("dir")).ok();
    }
}
