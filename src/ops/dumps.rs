//! The backup directory: dump names, checksum files, manifests.
//!
//! A dump `endpoint-stats-YYYYMMDDTHHMMSSZ.dump` (UTC) has two companions: `<dump>.sha256`
//! (`sha256sum -c` format) and `<dump>.manifest.json`. A dump is *good* when both exist; the
//! backup writes them before the dump appears, so a dump without them is damaged or foreign.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const DUMP_PREFIX: &str = "endpoint-stats-";
pub const DUMP_SUFFIX: &str = ".dump";
pub const CHECKSUM_SUFFIX: &str = ".sha256";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Files being written start with a dot and end with this, so no dump listing ever sees them.
pub const PARTIAL_SUFFIX: &str = ".partial";
const TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";
/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

pub fn dump_file_name(time: DateTime<Utc>) -> String {
    format!("{DUMP_PREFIX}{}{DUMP_SUFFIX}", time.format(TIME_FORMAT))
}

/// The time in a dump name, when the name is exactly `endpoint-stats-YYYYMMDDTHHMMSSZ.dump`.
pub fn parse_dump_name(name: &str) -> Option<DateTime<Utc>> {
    let stamp = name.strip_prefix(DUMP_PREFIX)?.strip_suffix(DUMP_SUFFIX)?;
    parse_stamp(stamp)
}

fn parse_stamp(stamp: &str) -> Option<DateTime<Utc>> {
    let bytes = stamp.as_bytes();
    let shape_ok = bytes.len() == 16
        && bytes[8] == b'T'
        && bytes[15] == b'Z'
        && bytes[..8].iter().chain(&bytes[9..15]).all(u8::is_ascii_digit);
    if !shape_ok {
        return None;
    }
    NaiveDateTime::parse_from_str(stamp, TIME_FORMAT).ok().map(|t| t.and_utc())
}

/// One dump file and where its companions are.
#[derive(Debug, Clone)]
pub struct DumpFile {
    pub path: PathBuf,
    pub name: String,
    /// The time in the name (`None` for a file restored with `--from` under another name).
    pub time: Option<DateTime<Utc>>,
}

impl DumpFile {
    pub fn from_path(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a file name", path.display()))?
            .to_owned();
        Ok(Self { path: path.to_owned(), time: parse_dump_name(&name), name })
    }

    pub fn checksum_path(&self) -> PathBuf {
        sibling(&self.path, &format!("{}{CHECKSUM_SUFFIX}", self.name))
    }

    pub fn manifest_path(&self) -> PathBuf {
        sibling(&self.path, &format!("{}{MANIFEST_SUFFIX}", self.name))
    }

    /// Has both its checksum and its manifest.
    pub fn is_good(&self) -> bool {
        self.checksum_path().is_file() && self.manifest_path().is_file()
    }
}

pub fn sibling(path: &Path, name: &str) -> PathBuf {
    path.parent().map_or_else(|| PathBuf::from(name), |dir| dir.join(name))
}

/// The temp name a final file is written under: hidden, and not matching any listing pattern.
pub fn partial_name(final_name: &str) -> String {
    format!(".{final_name}{PARTIAL_SUFFIX}")
}

/// Dumps in `dir` by the time in their names, oldest first.
pub fn list_dumps(dir: &Path) -> anyhow::Result<Vec<DumpFile>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read backup directory {}", dir.display()))?;
    let mut dumps = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read backup directory {}", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if let Some(time) = parse_dump_name(&name) {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                dumps.push(DumpFile { path: entry.path(), name, time: Some(time) });
            }
        }
    }
    dumps.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.name.cmp(&b.name)));
    Ok(dumps)
}

/// Of `dumps` (oldest first, as listed from `dir`), the newest with both companion files, and the
/// newer ones without them: a backup still being written, or one that failed half-way. The error
/// says why there is none.
pub fn newest_good<'a>(dumps: &'a [DumpFile], dir: &Path) -> Result<(&'a DumpFile, &'a [DumpFile]), String> {
    let Some(position) = dumps.iter().rposition(DumpFile::is_good) else {
        return Err(match dumps.last() {
            Some(d) => format!("no complete backup in {} ({} lacks its checksum or manifest)", dir.display(), d.name),
            None => format!("no backup in {}", dir.display()),
        });
    };
    Ok((&dumps[position], &dumps[position + 1..]))
}

pub fn newest_dump(dir: &Path) -> anyhow::Result<DumpFile> {
    list_dumps(dir)?.pop().with_context(|| {
        format!("no backup in {}: no file named {DUMP_PREFIX}YYYYMMDDTHHMMSSZ{DUMP_SUFFIX}", dir.display())
    })
}

/// Companion files (`.sha256`, `.manifest.json`) and unfinished files left in `dir`, with the time
/// in their names.
pub fn list_leftovers(dir: &Path) -> anyhow::Result<Vec<(PathBuf, DateTime<Utc>)>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read backup directory {}", dir.display()))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let base = name.strip_prefix('.').and_then(|n| n.strip_suffix(PARTIAL_SUFFIX)).unwrap_or(&name);
        let dump_name =
            base.strip_suffix(CHECKSUM_SUFFIX).or_else(|| base.strip_suffix(MANIFEST_SUFFIX)).unwrap_or(base);
        if dump_name == name {
            continue; // a dump itself, or not ours
        }
        if let Some(time) = parse_dump_name(dump_name) {
            found.push((entry.path(), time));
        }
    }
    Ok(found)
}

/// SHA-256 (hex) and length of a file, read in a blocking thread.
pub async fn sha256_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(String, u64)> {
        let mut file =
            std::fs::File::open(&owned).with_context(|| format!("cannot open {} to checksum it", owned.display()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buffer).with_context(|| format!("cannot read {}", owned.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            total += n as u64;
        }
        Ok((hex::encode(hasher.finalize()), total))
    })
    .await
    .context("checksum thread")?
}

/// A `sha256sum`-compatible line: `<hex>  <name>`.
pub fn checksum_line(hex: &str, name: &str) -> String {
    format!("{hex}  {name}\n")
}

/// The expected SHA-256 from a checksum file naming `dump_name`.
pub fn parse_checksum(text: &str, dump_name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (hex, rest) = line.split_once(char::is_whitespace)?;
        let name = rest.trim_start().trim_start_matches('*').trim_end();
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && name == dump_name).then(|| hex.to_ascii_lowercase())
    })
}

/// Checks a dump against its checksum file; returns its SHA-256 and length.
pub async fn verify_checksum(dump: &DumpFile) -> anyhow::Result<(String, u64)> {
    let checksum_path = dump.checksum_path();
    let text = match tokio::fs::read_to_string(&checksum_path).await {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("missing checksum file {} for {}", checksum_path.display(), dump.name)
        }
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", checksum_path.display())),
    };
    let expected = parse_checksum(&text, &dump.name)
        .with_context(|| format!("checksum file {} has no valid line for {}", checksum_path.display(), dump.name))?;
    let (actual, bytes) = sha256_file(&dump.path).await?;
    if actual != expected {
        anyhow::bail!(
            "checksum mismatch for {}: {} says {expected}, the file ({bytes} bytes) has {actual}",
            dump.path.display(),
            checksum_path.display()
        );
    }
    Ok((actual, bytes))
}

/// What a backup recorded about its dump: enough to prove a restore complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub file: String,
    pub created_at: DateTime<Utc>,
    pub tool: ToolInfo,
    pub pg_dump_version: String,
    pub database: String,
    pub server_version: String,
    pub server_version_num: i32,
    /// The exported snapshot that both the dump and the row counts were taken in.
    pub snapshot: String,
    pub database_bytes: i64,
    pub bytes: u64,
    pub sha256: String,
    pub duration_seconds: f64,
    pub tables: BTreeMap<String, TableInfo>,
    /// Applied `_sqlx_migrations` versions.
    pub migrations: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    pub name: String,
    pub version: String,
    pub revision: String,
}

/// One table as of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub rows: i64,
    /// `name type [not null]`, in column order.
    pub columns: Vec<String>,
    /// Index definitions, sorted.
    pub indexes: Vec<String>,
}

impl Manifest {
    pub fn total_rows(&self) -> i64 {
        self.tables.values().map(|t| t.rows).sum()
    }
}

pub async fn read_manifest(dump: &DumpFile) -> anyhow::Result<Manifest> {
    let path = dump.manifest_path();
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("missing manifest {} for {}", path.display(), dump.name)
        }
        Err(error) => return Err(error).with_context(|| format!("cannot read manifest {}", path.display())),
    };
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("manifest {} is not valid", path.display()))?;
    if manifest.format != MANIFEST_FORMAT {
        anyhow::bail!(
            "manifest {} has format {} (this binary reads format {MANIFEST_FORMAT})",
            path.display(),
            manifest.format
        );
    }
    Ok(manifest)
}

/// Checks a dump completely before it is restored: manifest present, checksum file and manifest
/// agree with the bytes on disk.
pub async fn check_dump(dump: &DumpFile) -> anyhow::Result<Manifest> {
    let manifest = read_manifest(dump).await?;
    let (sha256, bytes) = verify_checksum(dump).await?;
    if manifest.sha256 != sha256 || manifest.bytes != bytes {
        anyhow::bail!(
            "manifest {} does not describe {}: it records {} bytes with sha256 {}, the file has {bytes} bytes with {sha256}",
            dump.manifest_path().display(),
            dump.name,
            manifest.bytes,
            manifest.sha256
        );
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn dump_names_round_trip_and_reject_look_alikes() {
        let time = Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).single().expect("valid time");
        let name = dump_file_name(time);
        assert_eq!(name, "endpoint-stats-20260304T050607Z.dump");
        assert_eq!(parse_dump_name(&name), Some(time));
        for bad in [
            ".endpoint-stats-20260304T050607Z.dump.partial",
            "endpoint-stats-20260304T050607Z.dump.sha256",
            "endpoint-stats-2026034T050607Z.dump",
            "endpoint-stats-20261304T050607Z.dump",
            "endpoint-stats-+0260304T050607Z.dump",
            "other-20260304T050607Z.dump",
        ] {
            assert_eq!(parse_dump_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn checksum_lines_are_sha256sum_compatible() {
        let hex = "ab".repeat(32);
        let line = checksum_line(&hex, "x.dump");
        assert_eq!(line, format!("{hex}  x.dump\n"));
        assert_eq!(parse_checksum(&line, "x.dump"), Some(hex.clone()));
        assert_eq!(parse_checksum(&format!("{hex} *x.dump\n"), "x.dump"), Some(hex.clone()));
        assert_eq!(parse_checksum(&line, "y.dump"), None);
        assert_eq!(parse_checksum("zz  x.dump\n", "x.dump"), None);
    }
}
