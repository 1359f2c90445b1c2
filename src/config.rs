//! Configuration: Litestream's YAML format read strictly.
//!
//! Users arrive with a `litestream.yml`; it has to work unchanged, but where Litestream silently
//! ignores a typo or a wrong type, Walden stops with the file, line and key. The file is expanded
//! against the environment first (Litestream does that too, and configs in the wild rely on
//! `${LITESTREAM_ACCESS_KEY_ID}`), then parsed with `serde-saphyr`, which reports line numbers,
//! into raw structs that deny unknown keys, and finally resolved into [`Config`] with every
//! default filled in, so the rest of the program never sees an `Option` that means "default".
//!
//! Keys come from Litestream v0.3.13 and the common ones of v0.5 (`replica:`, top-level replica
//! defaults, `snapshot:`, `busy-timeout`, `shutdown-sync-timeout`). A Litestream key Walden does
//! not implement is recognised and refused by name ([`known_keys`] lists both kinds), because
//! accepting it silently would leave the user believing, say, that backups are encrypted.
//!
//! Invariant: no secret is ever part of an error, a warning or [`Config::to_yaml`]'s output.
//!
//! The syntax and key checks of serde stop at the first problem; the checks after parsing
//! (paths, replicas, names, destinations) collect every problem, so `walden config` can list
//! them all at once.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::format;
use crate::storage::s3::S3Config;

/// What went wrong while finding, reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every problem found in a file, one per line when displayed.
    #[error("{}", join_lines(problems))]
    Invalid { problems: Vec<Problem> },
    #[error("invalid replica url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("invalid duration {value:?}: {reason}")]
    Duration { value: String, reason: String },
    #[error("{0}")]
    Replica(String),
}

/// One problem in a configuration file: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; `None` when the problem belongs to the file as a whole.
    pub line: Option<u64>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

fn join_lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The effective configuration, defaults applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages; `None` when built from command-line arguments.
    pub source: Option<PathBuf>,
    pub dbs: Vec<DbConfig>,
    pub addr: Option<String>,
    pub exec: Option<String>,
    /// How long a child gets after SIGTERM/SIGINT before SIGKILL.
    pub shutdown_timeout: Duration,
    /// Litestream 0.5's `shutdown-sync-timeout`: the bound on the final sync. When it is not
    /// set the final sync is bounded by the shutdown timeout (see
    /// [`Config::final_sync_timeout`]), so `-shutdown-timeout` on the command line keeps
    /// working as one knob.
    pub shutdown_sync_timeout: Option<Duration>,
    pub logging: Logging,
    /// Problems worth a warning but not a refusal (unset variables), kept for the caller to
    /// log: `replicate` reads its logging settings from this very file, so nothing can be
    /// logged while it is being loaded.
    pub warnings: Vec<String>,
}

/// Default of `health-lag`: three missed uploads plus room for one slow one.
pub fn default_health_lag(sync_interval: Duration) -> Duration {
    sync_interval * 3 + Duration::from_secs(10)
}

/// Default of `shutdown-timeout`: long enough for an application to drain requests, short
/// enough to stay under systemd's default stop timeout of 90 s with the final sync.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest final sync Walden allows: one slow upload must still fit.
pub const MIN_FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Logging {
    pub level: Option<String>,
    pub json: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone)]
pub struct DbConfig {
    pub path: PathBuf,
    /// Where the shadow WAL lives; Litestream's `.<name>-litestream` next to the database by
    /// default so that switching between the two tools keeps the same generation.
    pub meta_path: PathBuf,
    pub monitor_interval: Duration,
    pub checkpoint_interval: Duration,
    /// SQLite busy timeout of the replicator's connection (Litestream 0.5's `busy-timeout`;
    /// fixed at 1 s in 0.3.13).
    pub busy_timeout: Duration,
    pub min_checkpoint_page_count: u32,
    pub max_checkpoint_page_count: u32,
    /// WAL size in bytes at which a TRUNCATE checkpoint is forced. Litestream counts 500,000
    /// pages, which is 32 GiB with 64 KiB pages and would let a WAL index pass the 4 GiB
    /// offsets its object names can hold; bytes keep every page size safe.
    pub truncate_wal_bytes: u64,
    /// In `replicate -exec`, restore the database from its replicas first when the file is
    /// missing.
    pub restore_if_db_not_exists: bool,
    /// Run a restore drill this often while replicating (off when `None`).
    pub verify_interval: Option<Duration>,
    pub replicas: Vec<ReplicaConfig>,
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub name: String,
    pub target: Target,
    pub sync_interval: Duration,
    pub snapshot_interval: Option<Duration>,
    pub retention: Option<Duration>,
    pub retention_check_interval: Duration,
    /// Committed data waiting longer than this for upload makes the replica unhealthy.
    pub health_lag: Duration,
}

#[derive(Debug, Clone)]
pub enum Target {
    File { dir: PathBuf },
    S3(S3Config),
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::File { .. } => "file",
            Target::S3(_) => "s3",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::File { dir } => write!(f, "file://{}", dir.display()),
            Target::S3(c) => {
                write!(f, "s3://{}/{}", c.bucket, c.prefix.trim_start_matches('/'))?;
                if let Some(e) = &c.endpoint {
                    write!(f, " (endpoint {e})")?;
                }
                Ok(())
            }
        }
    }
}

pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_RETENTION_CHECK: Duration = Duration::from_secs(3600);
/// Litestream's fixed busy timeout, the default of `busy-timeout`.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_MIN_CHECKPOINT_PAGES: u32 = 1000;
const DEFAULT_MAX_CHECKPOINT_PAGES: u32 = 10_000;
const DEFAULT_TRUNCATE_WAL_BYTES: u64 = 1 << 30;

/// The environment as a lookup function, so tests can resolve configs without touching the
/// process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads the process environment; the default [`Env`]. Empty values are returned as they
/// are, because `${VAR-default}` keeps an empty value while `${VAR:-default}` replaces it.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A variable's value when set and non-empty: an empty credential means "not set".
fn non_empty(env: Env, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// Top level. The S3 and interval keys after `logging` are Litestream 0.5's replica defaults
/// (`ReplicaSettings` inlined into its top level); a replica's own value wins.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    dbs: Option<Vec<Spanned<RawDb>>>,
    addr: Option<String>,
    exec: Option<String>,
    shutdown_timeout: Option<GoDuration>,
    shutdown_sync_timeout: Option<GoDuration>,
    logging: Option<RawLogging>,
    snapshot: Option<RawSnapshot>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: Option<bool>,
    sync_interval: Option<GoDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLogging {
    level: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    stderr: Option<bool>,
}

/// Litestream 0.5's `snapshot:` section, the defaults of every replica's `snapshot-interval`
/// and `retention`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSnapshot {
    interval: Option<GoDuration>,
    retention: Option<GoDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDb {
    path: Option<String>,
    meta_path: Option<String>,
    monitor_interval: Option<GoDuration>,
    checkpoint_interval: Option<GoDuration>,
    busy_timeout: Option<GoDuration>,
    min_checkpoint_page_count: Option<u32>,
    max_checkpoint_page_count: Option<u32>,
    truncate_wal_bytes: Option<u64>,
    restore_if_db_not_exists: Option<bool>,
    verify_interval: Option<GoDuration>,
    replicas: Option<Vec<Spanned<RawReplica>>>,
    /// Litestream 0.5's single replica; the same as a one-element `replicas`.
    replica: Option<Spanned<RawReplica>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawReplica {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    url: Option<String>,
    path: Option<String>,
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: Option<bool>,
    sync_interval: Option<GoDuration>,
    snapshot_interval: Option<GoDuration>,
    retention: Option<GoDuration>,
    retention_check_interval: Option<GoDuration>,
    health_lag: Option<GoDuration>,
}

/// A part of the file that has its own set of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Top,
    Logging,
    Snapshot,
    Db,
    Replica,
}

impl Section {
    const ALL: [Section; 5] = [
        Section::Top,
        Section::Logging,
        Section::Snapshot,
        Section::Db,
        Section::Replica,
    ];

    /// The keys Walden implements here, read from the serde structs so the list cannot drift.
    fn implemented(self) -> &'static [&'static str] {
        match self {
            Section::Top => struct_keys::<RawConfig>(),
            Section::Logging => struct_keys::<RawLogging>(),
            Section::Snapshot => struct_keys::<RawSnapshot>(),
            Section::Db => struct_keys::<RawDb>(),
            Section::Replica => struct_keys::<RawReplica>(),
        }
    }

    /// Litestream keys that are valid here but that Walden refuses, each with a hint.
    fn unsupported(self) -> Vec<(&'static str, Unsupported)> {
        let v05 = |keys: &[&'static str]| {
            keys.iter()
                .map(|k| (*k, Unsupported::V05(None)))
                .collect::<Vec<_>>()
        };
        match self {
            Section::Top => {
                let mut keys = v05(TOP_05);
                keys.extend(REPLICA_03.iter().map(|(k, _)| (*k, Unsupported::V05(None))));
                keys.extend(v05(REPLICA_05));
                keys
            }
            Section::Logging | Section::Snapshot => Vec::new(),
            Section::Db => {
                let mut keys = v05(DB_05);
                keys.push((
                    "truncate-page-n",
                    Unsupported::V05(Some("use truncate-wal-bytes, a size in bytes")),
                ));
                keys
            }
            Section::Replica => {
                let mut keys: Vec<_> = REPLICA_03
                    .iter()
                    .map(|(k, hint)| (*k, Unsupported::V03(hint)))
                    .collect();
                keys.extend(v05(REPLICA_05));
                keys
            }
        }
    }

    /// The section whose implemented keys are exactly `keys` (serde's "expected one of" list).
    fn with_keys(keys: &[&str]) -> Option<Section> {
        Section::ALL.into_iter().find(|s| {
            let mine = s.implemented();
            mine.len() == keys.len() && mine.iter().all(|k| keys.contains(k))
        })
    }
}

/// Why Walden refuses a Litestream key.
#[derive(Debug, Clone, Copy)]
enum Unsupported {
    /// A Litestream 0.3.13 key whose feature Walden has not implemented.
    V03(&'static str),
    /// A Litestream 0.5 key with no meaning in Walden, optionally with what to use instead.
    V05(Option<&'static str>),
}

/// Litestream 0.3.13 replica keys Walden does not implement, with the feature they belong to.
const REPLICA_03: &[(&str, &str)] = &[
    ("validation-interval", "replica validation"),
    ("age", "age encryption"),
    ("account-name", "Azure Blob Storage replicas"),
    ("account-key", "Azure Blob Storage replicas"),
    ("host", "SFTP replicas"),
    ("user", "SFTP replicas"),
    ("password", "SFTP replicas"),
    ("key-path", "SFTP replicas"),
];

/// Litestream 0.5 replica settings (also valid at its top level) with no Walden meaning.
const REPLICA_05: &[&str] = &[
    "auto-recover",
    "sign-payload",
    "require-content-md5",
    "part-size",
    "concurrency",
    "sse-customer-algorithm",
    "sse-customer-key",
    "sse-customer-key-path",
    "sse-kms-key-id",
    "sas-token",
    "concurrent-writes",
    "host-key",
    "webdav-url",
    "webdav-username",
    "webdav-password",
    "jwt",
    "seed",
    "creds",
    "nkey",
    "username",
    "token",
    "tls",
    "root-cas",
    "client-cert",
    "client-key",
    "max-reconnects",
    "reconnect-wait",
    "timeout",
];

/// Litestream 0.5 top-level keys with no Walden meaning.
const TOP_05: &[&str] = &[
    "socket",
    "levels",
    "validation",
    "l0-retention",
    "l0-retention-check-interval",
    "verify-compaction",
    "heartbeat-url",
    "heartbeat-interval",
    "mcp-addr",
    "shutdown-sync-interval",
];

/// Litestream 0.5 database keys with no Walden meaning (directory replication).
const DB_05: &[&str] = &["dir", "pattern", "recursive", "watch"];

/// One key of the configuration format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownKey {
    pub section: Section,
    pub key: &'static str,
    /// False for Litestream keys Walden recognises only to refuse them.
    pub supported: bool,
}

/// Every key Walden knows, implemented or refused, so documentation can be checked against
/// the parser.
pub fn known_keys() -> Vec<KnownKey> {
    let mut keys = Vec::new();
    for section in Section::ALL {
        keys.extend(section.implemented().iter().map(|key| KnownKey {
            section,
            key,
            supported: true,
        }));
        keys.extend(section.unsupported().into_iter().map(|(key, _)| KnownKey {
            section,
            key,
            supported: false,
        }));
    }
    keys
}

/// The field names serde derived for `T`: a deserializer that only records the list it is
/// handed by `deserialize_struct`.
fn struct_keys<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor, value::Error};
    struct Capture<'a>(&'a std::cell::Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Capture<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0.set(fields);
            Err(Error::custom("fields captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let fields = std::cell::Cell::new(&[][..]);
    let _ = T::deserialize(Capture(&fields));
    fields.get()
}

/// A duration written the way Go writes them (`500ms`, `1h30m`, `1.5h`), because every
/// Litestream config uses that syntax. A bare number is refused: Litestream reads it as
/// nanoseconds, which is never what the author meant.
#[derive(Debug, Clone, Copy)]
struct GoDuration(Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a Go duration string. Hand-written because no maintained crate implements Go's exact
/// grammar (fractions, `us`/`µs`, concatenated units without spaces).
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let err = |reason: &str| ConfigError::Duration {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(err("empty duration"));
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.starts_with('-') {
        return Err(err("negative durations are not allowed"));
    }
    if t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(err("add a unit, e.g. \"10s\", \"500ms\" or \"1h\""));
    }
    let mut rest = t.trim_start_matches('+');
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(err("expected a number"));
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| err("bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit; use ns, us, ms, s, m or h")),
        };
        total += n * scale;
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way Go prints one, so `walden config` output can be pasted back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = ms / 1000;
    let mut out = String::new();
    if s >= 3600 {
        out += &format!("{}h", s / 3600);
        s %= 3600;
    }
    if s >= 60 {
        out += &format!("{}m", s / 60);
        s %= 60;
    }
    if s > 0 {
        out += &format!("{s}s");
    }
    out
}

/// Result of expanding `$VAR` references: the text and every reference to a variable that was
/// unset and had no default, so the caller can name them.
pub struct Expanded {
    pub text: String,
    pub unset: Vec<UnsetVar>,
}

/// A reference to an unset variable without a default, at a 1-based line of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsetVar {
    pub name: String,
    pub line: u64,
}

/// Expands `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$` (a literal `$`).
///
/// Litestream uses Go's `os.ExpandEnv`, which has no defaults and no escape; configs written
/// for shells use both, so Walden accepts the superset.
pub fn expand_env(text: &str, env: Env) -> Expanded {
    let mut out = String::with_capacity(text.len());
    let mut unset = Vec::new();
    let line_of = |i: usize| 1 + text[..i].matches('\n').count() as u64;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek().map(|&(_, c)| c) {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                let body_start = i + 2;
                let Some(close) = text[body_start..].find('}') else {
                    out.push_str(&text[i..]);
                    break;
                };
                let body = &text[body_start..body_start + close];
                let (name, default) = if let Some(p) = body.find(":-") {
                    (&body[..p], Some((&body[p + 2..], true)))
                } else if let Some(p) = body.find('-') {
                    (&body[..p], Some((&body[p + 1..], false)))
                } else {
                    (body, None)
                };
                let value = env(name);
                match (value, default) {
                    (Some(v), Some((d, true))) if v.is_empty() => out.push_str(d),
                    (Some(v), _) => out.push_str(&v),
                    (None, Some((d, _))) => out.push_str(d),
                    (None, None) => unset.push(UnsetVar {
                        name: name.to_string(),
                        line: line_of(i),
                    }),
                }
                while let Some(&(j, _)) = chars.peek() {
                    if j > body_start + close {
                        break;
                    }
                    chars.next();
                }
            }
            Some(c2) if c2 == '_' || c2.is_ascii_alphabetic() => {
                let start = i + 1;
                let mut end = start;
                while let Some(&(j, c)) = chars.peek() {
                    if c == '_' || c.is_ascii_alphanumeric() {
                        end = j + c.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let name = &text[start..end];
                match env(name) {
                    Some(v) => out.push_str(&v),
                    None => unset.push(UnsetVar {
                        name: name.to_string(),
                        line: line_of(i),
                    }),
                }
            }
            _ => out.push('$'),
        }
    }
    Expanded { text: out, unset }
}

/// Keys whose value must never silently become empty: an empty credential falls through to
/// another source (or none) and an empty bucket is a different destination.
const REQUIRED_WHEN_REFERENCED: [&str; 3] = ["access-key-id", "secret-access-key", "bucket"];

/// The key defined on `line` of `text` if it is one of [`REQUIRED_WHEN_REFERENCED`]. Read from
/// the text, because after expansion an unset variable leaves an empty value that YAML reads
/// as null, with no position to report.
fn required_key_on_line(text: &str, line: u64) -> Option<&'static str> {
    let l = text.lines().nth(line.checked_sub(1)? as usize)?;
    let l = l.trim_start().trim_start_matches("- ").trim_start();
    REQUIRED_WHEN_REFERENCED.into_iter().find(|k| {
        l.strip_prefix(k)
            .is_some_and(|r| r.trim_start().starts_with(':'))
    })
}

/// Options that change how a file is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub no_expand_env: bool,
}

/// Reads and resolves a config file. Unset variables are logged as one warning, except in
/// credential and bucket fields, where they are errors.
pub fn load(path: &Path, opts: LoadOptions, env: Env) -> Result<Config, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::NotFound(path.to_path_buf()));
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let file = path.display().to_string();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let text = if opts.no_expand_env {
        text
    } else {
        let expanded = expand_env(&text, env);
        let mut warn = BTreeSet::new();
        for u in &expanded.unset {
            match required_key_on_line(&text, u.line) {
                Some(key) => problems.push(Problem {
                    file: file.clone(),
                    line: Some(u.line),
                    message: format!(
                        "`{key}` uses the environment variable {} which is not set; set it, \
                         or run with -no-expand-env to read the file literally",
                        u.name
                    ),
                }),
                None => {
                    warn.insert(u.name.as_str());
                }
            }
        }
        if !warn.is_empty() {
            warnings.push(format!(
                "{file}: config references unset environment variables: {}",
                warn.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        expanded.text
    };
    let mut cfg = parse_checked(&text, &file, env, problems)?;
    cfg.source = Some(path.to_path_buf());
    cfg.warnings = warnings;
    Ok(cfg)
}

/// Parses and resolves config text that is already expanded; `file` names it in messages.
pub fn parse(text: &str, file: &str, env: Env) -> Result<Config, ConfigError> {
    parse_checked(text, file, env, Vec::new())
}

/// Parses and resolves, adding any problem to `problems` found before parsing.
fn parse_checked(
    text: &str,
    file: &str,
    env: Env,
    mut problems: Vec<Problem>,
) -> Result<Config, ConfigError> {
    let raw: Result<RawConfig, _> = if text.trim().is_empty() {
        Ok(RawConfig::default())
    } else {
        serde_saphyr::from_str(text)
    };
    match raw {
        Ok(raw) => {
            let mut found = Problems {
                file,
                list: problems,
            };
            let cfg = resolve(raw, &mut found, env);
            problems = found.list;
            if problems.is_empty() {
                return Ok(cfg);
            }
        }
        Err(e) => problems.push(parse_problem(file, &e)),
    }
    problems.sort_by_key(|p| p.line);
    Err(ConfigError::Invalid { problems })
}

fn parse_problem(file: &str, e: &serde_saphyr::Error) -> Problem {
    let plain = e.without_snippet().to_string();
    let message = match plain.rfind(" at line ") {
        Some(p) => plain[..p].to_string(),
        None => plain,
    };
    Problem {
        file: file.to_string(),
        line: e.location().map(|l| l.line()),
        message: explain(&message),
    }
}

/// Makes a parser message say what to do: unknown keys get [`explain_unknown_key`], scalars
/// of the wrong kind say which kind was expected.
fn explain(message: &str) -> String {
    match message {
        "invalid boolean" => "invalid boolean; expected true or false".into(),
        m if m.starts_with("invalid u") || m.starts_with("invalid i") => {
            format!("{m}; expected a whole number")
        }
        m => explain_unknown_key(m),
    }
}

/// Turns serde's "unknown field `x`, expected one of a, b" into a sentence: a Litestream key
/// Walden refuses is named as such, anything else gets the nearest valid key, because a typo
/// is the usual cause.
fn explain_unknown_key(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some(end) = rest.find('`') else {
        return message.to_string();
    };
    let key = &rest[..end];
    let expected: Vec<&str> = rest[end..]
        .split_once("expected one of ")
        .or_else(|| rest[end..].split_once("expected "))
        .map(|(_, list)| {
            list.split(',')
                .map(|s| s.trim().trim_matches('`'))
                .collect()
        })
        .unwrap_or_default();
    if let Some(section) = Section::with_keys(&expected)
        && let Some((_, why)) = section.unsupported().into_iter().find(|(k, _)| *k == key)
    {
        return match why {
            Unsupported::V03(feature) => {
                format!("`{key}` is a Litestream key walden does not support yet ({feature})")
            }
            Unsupported::V05(None) => {
                format!("`{key}` is a Litestream 0.5 key walden does not support")
            }
            Unsupported::V05(Some(hint)) => {
                format!("`{key}` is a Litestream 0.5 key walden does not support; {hint}")
            }
        };
    }
    let best = expected
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .min()
        .filter(|(d, k)| *d <= 3.max(k.len() / 3));
    match best {
        Some((_, k)) => format!("`{key}` is not a key; did you mean `{k}`?"),
        None => format!(
            "`{key}` is not a key; valid keys here: {}",
            expected.join(", ")
        ),
    }
}

/// Problems found while resolving, collected so that all of them can be reported at once.
struct Problems<'a> {
    file: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn add(&mut self, line: Option<u64>, message: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.to_string(),
            line,
            message: message.into(),
        });
    }
}

/// Litestream 0.5's top-level replica settings and `snapshot:` section: defaults for every
/// replica, which a replica's own value overrides.
#[derive(Default)]
struct ReplicaDefaults {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: Option<bool>,
    sync_interval: Option<GoDuration>,
    snapshot_interval: Option<GoDuration>,
    retention: Option<GoDuration>,
}

const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "warning", "error"];

/// Resolves the raw file into a [`Config`], adding every problem to `found`; the returned
/// config is only meaningful when no problem was added.
fn resolve(raw: RawConfig, found: &mut Problems, env: Env) -> Config {
    let logging = raw.logging.unwrap_or_default();
    let json = match logging
        .kind
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            found.add(None, format!("logging.type {other:?} must be text or json"));
            false
        }
    };
    if let Some(level) = &logging.level
        && !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str())
    {
        found.add(
            None,
            format!(
                "logging.level {level:?} must be one of {}",
                LOG_LEVELS.join(", ")
            ),
        );
    }
    let snapshot = raw.snapshot.unwrap_or_default();
    for (key, value) in [
        ("snapshot.interval", snapshot.interval),
        ("snapshot.retention", snapshot.retention),
        ("sync-interval", raw.sync_interval),
    ] {
        if value.is_some_and(|d| d.0.is_zero()) {
            found.add(None, format!("{key} must be greater than 0"));
        }
    }
    let defaults = ReplicaDefaults {
        access_key_id: raw.access_key_id.filter(|s| !s.is_empty()),
        secret_access_key: raw.secret_access_key.filter(|s| !s.is_empty()),
        bucket: raw.bucket.filter(|s| !s.is_empty()),
        endpoint: raw.endpoint.filter(|s| !s.is_empty()),
        region: raw.region.filter(|s| !s.is_empty()),
        force_path_style: raw.force_path_style,
        skip_verify: raw.skip_verify,
        sync_interval: raw.sync_interval,
        snapshot_interval: snapshot.interval,
        retention: snapshot.retention,
    };
    let mut dbs: Vec<DbConfig> = Vec::new();
    for (i, db) in raw.dbs.unwrap_or_default().into_iter().enumerate() {
        let line = Some(db.referenced.line());
        if let Some(db) = resolve_db(db.value, i, line, &defaults, found, env) {
            if dbs.iter().any(|d| d.path == db.path) {
                found.add(
                    line,
                    format!(
                        "dbs[{i}]: {} is listed twice; merge its replicas into one entry",
                        db.path.display()
                    ),
                );
            }
            dbs.push(db);
        }
    }
    check_destinations(&dbs, found);
    Config {
        source: None,
        dbs,
        addr: raw.addr.filter(|a| !a.is_empty()),
        exec: raw.exec.filter(|e| !e.trim().is_empty()),
        shutdown_timeout: raw
            .shutdown_timeout
            .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0),
        shutdown_sync_timeout: raw.shutdown_sync_timeout.map(|d| d.0),
        logging: Logging {
            level: logging.level,
            json,
            stderr: logging.stderr.unwrap_or(false),
        },
        warnings: Vec::new(),
    }
}

fn resolve_db(
    db: RawDb,
    i: usize,
    line: Option<u64>,
    defaults: &ReplicaDefaults,
    found: &mut Problems,
    env: Env,
) -> Option<DbConfig> {
    let path = db.path.filter(|p| !p.is_empty());
    if path.is_none() {
        found.add(line, format!("dbs[{i}]: `path` is required"));
    }
    let raw_replicas: Vec<(String, Spanned<RawReplica>)> = match (db.replica, db.replicas) {
        (Some(_), Some(_)) => {
            found.add(
                line,
                format!("dbs[{i}]: `replica` and `replicas` cannot both be set; use one"),
            );
            Vec::new()
        }
        (Some(r), None) => vec![(format!("dbs[{i}].replica"), r)],
        (None, list) => list
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(j, r)| (format!("dbs[{i}].replicas[{j}]"), r))
            .collect(),
    };
    let mut replicas: Vec<ReplicaConfig> = Vec::new();
    for (at, r) in raw_replicas {
        let rline = Some(r.referenced.line());
        match resolve_replica(r.value, defaults, env) {
            Ok(rep) => {
                if replicas.iter().any(|x| x.name == rep.name) {
                    found.add(
                        rline,
                        format!(
                            "{at}: two replicas are named {:?}; give each a distinct `name`",
                            rep.name
                        ),
                    );
                }
                replicas.push(rep);
            }
            Err(e) => found.add(rline, format!("{at}: {e}")),
        }
    }
    let min = db
        .min_checkpoint_page_count
        .unwrap_or(DEFAULT_MIN_CHECKPOINT_PAGES);
    if min == 0 {
        found.add(
            line,
            format!("dbs[{i}]: min-checkpoint-page-count must be greater than 0"),
        );
    }
    let path = absolute(&expand_tilde(&path?));
    let meta_path = match db.meta_path {
        Some(m) => absolute(&expand_tilde(&m)),
        None => default_meta_path(&path),
    };
    Some(DbConfig {
        path,
        meta_path,
        monitor_interval: db
            .monitor_interval
            .map_or(DEFAULT_MONITOR_INTERVAL, |d| d.0),
        checkpoint_interval: db
            .checkpoint_interval
            .map_or(DEFAULT_CHECKPOINT_INTERVAL, |d| d.0),
        busy_timeout: db.busy_timeout.map_or(DEFAULT_BUSY_TIMEOUT, |d| d.0),
        min_checkpoint_page_count: min,
        max_checkpoint_page_count: db
            .max_checkpoint_page_count
            .unwrap_or(DEFAULT_MAX_CHECKPOINT_PAGES),
        truncate_wal_bytes: db
            .truncate_wal_bytes
            .unwrap_or(DEFAULT_TRUNCATE_WAL_BYTES)
            .min(DEFAULT_TRUNCATE_WAL_BYTES * 3),
        restore_if_db_not_exists: db.restore_if_db_not_exists.unwrap_or(true),
        verify_interval: db.verify_interval.map(|d| d.0).filter(|d| !d.is_zero()),
        replicas,
    })
}

/// Two replicas writing to the same place would interleave two databases' generations and
/// make both unrestorable; the usual cause is a multi-database config that forgot a `path`.
fn check_destinations(dbs: &[DbConfig], found: &mut Problems) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for db in dbs {
        for r in &db.replicas {
            let place = match &r.target {
                Target::File { dir } => format!("file://{}", dir.display()),
                Target::S3(s3) => format!(
                    "s3://{}/{} at {}",
                    s3.bucket,
                    s3.prefix.trim_matches('/'),
                    s3.endpoint.as_deref().unwrap_or("AWS")
                ),
            };
            let who = format!("replica {:?} of {}", r.name, db.path.display());
            if let Some(first) = seen.get(&place) {
                found.add(
                    None,
                    format!(
                        "{first} and {who} both write to {place}; give each database its own \
                         `path`"
                    ),
                );
            } else {
                seen.insert(place, who);
            }
        }
    }
}

fn resolve_replica(
    r: RawReplica,
    defaults: &ReplicaDefaults,
    env: Env,
) -> Result<ReplicaConfig, ConfigError> {
    let sync_interval = r
        .sync_interval
        .or(defaults.sync_interval)
        .map_or(DEFAULT_SYNC_INTERVAL, |d| d.0);
    if sync_interval.is_zero() {
        return Err(ConfigError::Replica(
            "sync-interval must be greater than 0".into(),
        ));
    }
    let snapshot_interval = r
        .snapshot_interval
        .or(defaults.snapshot_interval)
        .map(|d| d.0)
        .filter(|d| !d.is_zero());
    let retention = match r.retention.or(defaults.retention) {
        None => Some(DEFAULT_RETENTION),
        Some(d) if d.0.is_zero() => None,
        Some(d) => Some(d.0),
    };
    let retention_check_interval = r
        .retention_check_interval
        .map_or(DEFAULT_RETENTION_CHECK, |d| d.0);
    let (target, default_name) = resolve_target(&r, defaults, env)?;
    Ok(ReplicaConfig {
        name: r.name.clone().unwrap_or_else(|| default_name.to_string()),
        target,
        sync_interval,
        snapshot_interval,
        retention,
        retention_check_interval,
        health_lag: r
            .health_lag
            .map_or(default_health_lag(sync_interval), |d| d.0),
    })
}

fn resolve_target(
    r: &RawReplica,
    defaults: &ReplicaDefaults,
    env: Env,
) -> Result<(Target, &'static str), ConfigError> {
    let kind = r.kind.as_deref().filter(|k| !k.is_empty());
    if let Some(url) = r.url.as_deref().filter(|u| !u.is_empty()) {
        if r.path.is_some() {
            return Err(ConfigError::Replica(
                "`url` and `path` cannot both be set".into(),
            ));
        }
        let mut parsed = parse_replica_url(url)?;
        if let ParsedUrl::S3(s3) = &mut parsed {
            if r.bucket.is_some() {
                return Err(ConfigError::Replica(
                    "`url` and `bucket` cannot both be set".into(),
                ));
            }
            apply_s3_fields(s3, r, defaults);
        }
        return finish_target(parsed, r, defaults, env);
    }
    let own_bucket = r.bucket.clone().filter(|b| !b.is_empty());
    match kind {
        None if own_bucket.is_none() && defaults.bucket.is_some() => Err(ConfigError::Replica(
            "no `type`, and a top-level `bucket` is set: say `type: s3` to use that \
                 bucket or `type: file` for a directory"
                .into(),
        )),
        Some("file") | None if own_bucket.is_none() => {
            let path = r.path.as_deref().filter(|p| !p.is_empty()).ok_or_else(|| {
                ConfigError::Replica("a file replica needs `path` or `url`".into())
            })?;
            Ok((
                Target::File {
                    dir: absolute(&expand_tilde(path)),
                },
                "file",
            ))
        }
        Some("s3") | None => {
            let bucket = own_bucket.or(defaults.bucket.clone()).ok_or_else(|| {
                ConfigError::Replica("an s3 replica needs `bucket` or `url`".into())
            })?;
            let mut s3 = PartialS3 {
                bucket,
                prefix: r.path.clone().unwrap_or_default(),
                ..PartialS3::default()
            };
            apply_s3_fields(&mut s3, r, defaults);
            finish_target(ParsedUrl::S3(s3), r, defaults, env)
        }
        Some("file") => Err(ConfigError::Replica(
            "`bucket` is set on a file replica; use `type: s3` or remove `bucket`".into(),
        )),
        Some(other @ ("gcs" | "gs" | "abs" | "sftp" | "webdav" | "nats" | "oss")) => {
            Err(ConfigError::Replica(format!(
                "replica type {other:?} is not supported by walden yet; only s3 and file are"
            )))
        }
        Some(other) => Err(ConfigError::Replica(format!(
            "unknown replica type {other:?}; expected s3 or file"
        ))),
    }
}

/// Applies the replica's own S3 fields over what its URL said, then the top-level defaults
/// where neither said anything.
fn apply_s3_fields(s3: &mut PartialS3, r: &RawReplica, defaults: &ReplicaDefaults) {
    if let Some(e) = r.endpoint.clone().filter(|e| !e.is_empty()) {
        s3.endpoint = Some(e);
    }
    if let Some(reg) = r.region.clone().filter(|e| !e.is_empty()) {
        s3.region = Some(reg);
    }
    if let Some(f) = r.force_path_style {
        s3.force_path_style = Some(f || s3.force_path_style == Some(true) && s3.host_form);
    }
    if let Some(v) = r.skip_verify {
        s3.skip_verify = v;
    } else if let Some(v) = defaults.skip_verify {
        s3.skip_verify = v;
    }
    if s3.endpoint.is_none() {
        s3.endpoint = defaults.endpoint.clone();
    }
    if s3.region.is_none() {
        s3.region = defaults.region.clone();
    }
    if s3.force_path_style.is_none() {
        s3.force_path_style = defaults.force_path_style;
    }
}

fn finish_target(
    parsed: ParsedUrl,
    r: &RawReplica,
    defaults: &ReplicaDefaults,
    env: Env,
) -> Result<(Target, &'static str), ConfigError> {
    match parsed {
        ParsedUrl::File(dir) => Ok((Target::File { dir }, "file")),
        ParsedUrl::S3(s3) => {
            let creds = resolve_credentials(
                r.access_key_id.clone(),
                r.secret_access_key.clone(),
                defaults,
                env,
            );
            Ok((Target::S3(s3.finish(creds)), "s3"))
        }
    }
}

/// Static credentials in Litestream's order: replica keys, top-level keys, `LITESTREAM_*`,
/// `AWS_*`, then the shared credentials file's profile. There is deliberately no
/// instance-metadata fallback: a missing key is a startup error, not a silent network lookup.
fn resolve_credentials(
    key: Option<String>,
    secret: Option<String>,
    top: &ReplicaDefaults,
    env: Env,
) -> Credentials {
    let key = key.filter(|s| !s.is_empty());
    let secret = secret.filter(|s| !s.is_empty());
    let aws_key = non_empty(env, "AWS_ACCESS_KEY_ID").or_else(|| non_empty(env, "AWS_ACCESS_KEY"));
    let aws_secret =
        non_empty(env, "AWS_SECRET_ACCESS_KEY").or_else(|| non_empty(env, "AWS_SECRET_KEY"));
    let (key, secret, token) = if key.is_some() || secret.is_some() {
        (key, secret, None)
    } else if top.access_key_id.is_some() || top.secret_access_key.is_some() {
        (
            top.access_key_id.clone(),
            top.secret_access_key.clone(),
            None,
        )
    } else if non_empty(env, "LITESTREAM_ACCESS_KEY_ID").is_some()
        || non_empty(env, "LITESTREAM_SECRET_ACCESS_KEY").is_some()
    {
        (
            non_empty(env, "LITESTREAM_ACCESS_KEY_ID"),
            non_empty(env, "LITESTREAM_SECRET_ACCESS_KEY"),
            None,
        )
    } else if aws_key.is_some() || aws_secret.is_some() {
        (aws_key, aws_secret, non_empty(env, "AWS_SESSION_TOKEN"))
    } else {
        profile_credentials(env).unwrap_or_default()
    };
    // A missing key or secret is reported when the store is opened, so commands that never
    // touch the store (`databases`) work without credentials.
    Credentials {
        access_key_id: key.unwrap_or_default(),
        secret_access_key: secret.unwrap_or_default(),
        session_token: token,
    }
}

/// Key, secret and session token from a shared credentials file, as found.
type FileCredentials = (Option<String>, Option<String>, Option<String>);

/// The `AWS_PROFILE` profile (default `default`) of the shared credentials file
/// (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`). A missing file or profile
/// means no credentials from here; the store reports that when it is opened.
fn profile_credentials(env: Env) -> Option<FileCredentials> {
    let path = match non_empty(env, "AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => expand_tilde(&p),
        None => Path::new(&non_empty(env, "HOME")?).join(".aws/credentials"),
    };
    let profile = non_empty(env, "AWS_PROFILE").unwrap_or_else(|| "default".into());
    let text = std::fs::read_to_string(path).ok()?;
    parse_credentials_file(&text, &profile)
}

/// Reads one profile of an INI-style AWS credentials file; `None` if the profile is absent.
fn parse_credentials_file(text: &str, profile: &str) -> Option<FileCredentials> {
    let mut in_profile = false;
    let mut found = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            found |= in_profile;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !in_profile {
            continue;
        }
        let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => key = v,
            "aws_secret_access_key" => secret = v,
            "aws_session_token" => token = v,
            _ => {}
        }
    }
    found.then_some((key, secret, token))
}

struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// S3 settings gathered from a URL and config fields before credentials are known.
#[derive(Default, Debug, Clone)]
struct PartialS3 {
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: bool,
    /// The endpoint came from a recognised `bucket.<provider>` host, which always needs
    /// path-style requests.
    host_form: bool,
}

impl PartialS3 {
    fn finish(self, c: Credentials) -> S3Config {
        let region = self.region.unwrap_or_else(|| "us-east-1".to_string());
        let force_path_style = self.force_path_style.unwrap_or(self.endpoint.is_some());
        // A local endpoint without a scheme is a test or LAN server that speaks plain HTTP;
        // anything else without a scheme gets https from the store.
        let endpoint = self.endpoint.map(|e| {
            if !e.contains("://") && is_local_endpoint(&e) {
                format!("http://{e}")
            } else {
                e
            }
        });
        S3Config {
            bucket: self.bucket,
            prefix: self.prefix,
            endpoint,
            region,
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            session_token: c.session_token,
            force_path_style,
            skip_verify: self.skip_verify,
        }
    }
}

enum ParsedUrl {
    File(PathBuf),
    S3(PartialS3),
}

/// Builds a replica from a URL given on the command line, with credentials from the
/// environment.
pub fn replica_from_url(url: &str, env: Env) -> Result<ReplicaConfig, ConfigError> {
    let raw = RawReplica {
        url: Some(url.to_string()),
        ..RawReplica::default()
    };
    resolve_replica(raw, &ReplicaDefaults::default(), env)
}

/// Whether a command-line argument is a replica URL rather than a database path.
pub fn is_url(s: &str) -> bool {
    s.contains("://")
}

fn parse_replica_url(url: &str) -> Result<ParsedUrl, ConfigError> {
    let bad = |reason: &str| ConfigError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        // `s3:bucket/x` is a mistyped URL, not a directory named `s3:bucket`.
        if let Some((word, _)) = url.split_once(':')
            && !word.is_empty()
            && word.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(bad(
                "expected scheme://, e.g. s3://bucket/path or file:///dir",
            ));
        }
        return Ok(ParsedUrl::File(absolute(&expand_tilde(
            &format::clean_path(url),
        ))));
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    match scheme {
        "file" => {
            if query.is_some() {
                return Err(bad("file URLs take no query options"));
            }
            if !rest.starts_with('/') {
                return Err(bad(
                    "a file URL needs an absolute path, e.g. file:///var/backups/app",
                ));
            }
            Ok(ParsedUrl::File(PathBuf::from(format::clean_path(rest))))
        }
        "s3" => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad("missing bucket name"));
            }
            let mut s3 = detect_provider(host);
            s3.prefix = format::clean_path(path).trim_start_matches('/').to_string();
            if s3.prefix == "." {
                s3.prefix.clear();
            }
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
                let v = percent_decode(v);
                match k {
                    "endpoint" => s3.endpoint = Some(v),
                    "region" => s3.region = Some(v),
                    "force-path-style" | "forcePathStyle" => {
                        s3.force_path_style = Some(
                            parse_bool(&v)
                                .ok_or_else(|| bad("force-path-style must be true or false"))?,
                        )
                    }
                    "skip-verify" | "skipVerify" => {
                        s3.skip_verify = parse_bool(&v)
                            .ok_or_else(|| bad("skip-verify must be true or false"))?
                    }
                    other => {
                        return Err(bad(&format!(
                            "unknown query option {other:?}; expected endpoint, region, \
                             force-path-style or skip-verify"
                        )));
                    }
                }
            }
            if let Some(e) = &s3.endpoint
                && s3.force_path_style.is_none()
                && is_local_endpoint(e)
            {
                s3.force_path_style = Some(true);
            }
            Ok(ParsedUrl::S3(s3))
        }
        "gcs" | "abs" | "sftp" | "gs" => Err(bad(&format!(
            "{scheme}:// replicas are not supported by walden yet; use s3:// or file://"
        ))),
        _ => Err(bad("unknown scheme; expected s3:// or file://")),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len() + 1
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_local_endpoint(endpoint: &str) -> bool {
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, h)| h)
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok()
}

/// A provider whose bucket URLs carry the endpoint and region: `BUCKET.<host>` where the host
/// is the last `host_labels` labels, ends in `suffix`, has `marker` at a label counted from the
/// right (for example the `s3` of `s3.REGION.backblazeb2.com`), and names the region.
struct Provider {
    suffix: &'static str,
    host_labels: usize,
    marker: Option<(usize, &'static str)>,
    region: ProviderRegion,
}

enum ProviderRegion {
    /// The region is this label, counted from the right.
    Label(usize),
    Fixed(&'static str),
}

const PROVIDERS: [Provider; 6] = [
    // BUCKET.s3.REGION.backblazeb2.com
    Provider {
        suffix: "backblazeb2.com",
        host_labels: 4,
        marker: Some((4, "s3")),
        region: ProviderRegion::Label(3),
    },
    // BUCKET.s3.filebase.com
    Provider {
        suffix: "s3.filebase.com",
        host_labels: 3,
        marker: None,
        region: ProviderRegion::Fixed("us-east-1"),
    },
    // BUCKET.REGION.digitaloceanspaces.com
    Provider {
        suffix: "digitaloceanspaces.com",
        host_labels: 3,
        marker: None,
        region: ProviderRegion::Label(3),
    },
    // BUCKET.s3.REGION.scw.cloud
    Provider {
        suffix: "scw.cloud",
        host_labels: 4,
        marker: Some((4, "s3")),
        region: ProviderRegion::Label(3),
    },
    // BUCKET.REGION.linodeobjects.com
    Provider {
        suffix: "linodeobjects.com",
        host_labels: 3,
        marker: None,
        region: ProviderRegion::Label(3),
    },
    // BUCKET.ACCOUNT.r2.cloudflarestorage.com
    Provider {
        suffix: "cloudflarestorage.com",
        host_labels: 4,
        marker: Some((3, "r2")),
        region: ProviderRegion::Fixed("auto"),
    },
];

/// Recognises `bucket.<provider host>` forms (Litestream's list plus Cloudflare R2), which
/// carry the endpoint and region in the host name.
fn detect_provider(host: &str) -> PartialS3 {
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    };
    let with_port = |h: &str| match port {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    };
    let found = |bucket: &str, endpoint: String, region: &str| PartialS3 {
        bucket: bucket.to_string(),
        endpoint: Some(endpoint),
        region: Some(region.to_string()),
        force_path_style: Some(true),
        host_form: true,
        ..PartialS3::default()
    };
    if let Some(bucket) = name.strip_suffix(".localhost") {
        return found(
            bucket,
            format!("http://{}", with_port("localhost")),
            "us-east-1",
        );
    }
    let labels: Vec<&str> = name.split('.').collect();
    let n = labels.len();
    let tail = |k: usize| labels[n.saturating_sub(k)..].join(".");
    for p in &PROVIDERS {
        let suffix_labels = p.suffix.split('.').count();
        if n > p.host_labels
            && tail(suffix_labels) == p.suffix
            && p.marker.is_none_or(|(i, m)| labels[n - i] == m)
        {
            let region = match p.region {
                ProviderRegion::Label(i) => labels[n - i],
                ProviderRegion::Fixed(r) => r,
            };
            return found(
                &labels[..n - p.host_labels].join("."),
                format!("https://{}", with_port(&tail(p.host_labels))),
                region,
            );
        }
    }
    PartialS3 {
        bucket: host.to_string(),
        ..PartialS3::default()
    }
}

fn expand_tilde(p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        return Path::new(&home).join(rest);
    }
    PathBuf::from(p)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Litestream's metadata directory name, kept so a database moved from Litestream to Walden
/// continues its generation instead of starting a new one.
pub fn default_meta_path(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    db.with_file_name(format!(".{name}-litestream"))
}

/// A database with replicas given on the command line (`walden replicate DB URL...`).
pub fn db_from_args(path: &Path, replicas: Vec<ReplicaConfig>) -> DbConfig {
    let path = absolute(path);
    DbConfig {
        meta_path: default_meta_path(&path),
        path,
        monitor_interval: DEFAULT_MONITOR_INTERVAL,
        checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        busy_timeout: DEFAULT_BUSY_TIMEOUT,
        min_checkpoint_page_count: DEFAULT_MIN_CHECKPOINT_PAGES,
        max_checkpoint_page_count: DEFAULT_MAX_CHECKPOINT_PAGES,
        truncate_wal_bytes: DEFAULT_TRUNCATE_WAL_BYTES,
        restore_if_db_not_exists: true,
        verify_interval: None,
        replicas,
    }
}

/// Finds the config file: the flag, then `$WALDEN_CONFIG`, `$LITESTREAM_CONFIG`,
/// `./walden.yml`, `/etc/walden.yml`, `/etc/litestream.yml`.
pub fn locate(flag: Option<&Path>, env: Env) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(expand_tilde(&p.to_string_lossy()));
    }
    for var in ["WALDEN_CONFIG", "LITESTREAM_CONFIG"] {
        if let Some(p) = non_empty(env, var) {
            return Some(expand_tilde(&p));
        }
    }
    ["walden.yml", "/etc/walden.yml", "/etc/litestream.yml"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Default for Config {
    fn default() -> Config {
        Config {
            source: None,
            dbs: Vec::new(),
            addr: None,
            exec: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            shutdown_sync_timeout: None,
            logging: Logging::default(),
            warnings: Vec::new(),
        }
    }
}

impl Config {
    /// The database entry whose path is `path`, compared after making both absolute.
    pub fn db(&self, path: &Path) -> Option<&DbConfig> {
        let want = absolute(path);
        self.dbs.iter().find(|d| d.path == want)
    }

    /// How long the final sync at shutdown may take: `shutdown-sync-timeout`, else the
    /// shutdown timeout, never less than [`MIN_FINAL_SYNC_TIMEOUT`].
    pub fn final_sync_timeout(&self) -> Duration {
        self.shutdown_sync_timeout
            .unwrap_or(self.shutdown_timeout)
            .max(MIN_FINAL_SYNC_TIMEOUT)
    }

    /// The effective configuration as YAML in the file's own keys, every default filled in
    /// and every secret shown as `<redacted>`, so it can be read, diffed and pasted back.
    pub fn to_yaml(&self) -> String {
        let view = ConfigView {
            addr: self.addr.as_deref(),
            exec: self.exec.as_deref(),
            shutdown_timeout: format_duration(self.shutdown_timeout),
            shutdown_sync_timeout: format_duration(self.final_sync_timeout()),
            logging: LoggingView {
                level: self.logging.level.as_deref().unwrap_or("info"),
                kind: if self.logging.json { "json" } else { "text" },
                stderr: self.logging.stderr,
            },
            dbs: self.dbs.iter().map(DbView::of).collect(),
        };
        let mut out = String::new();
        if let Some(src) = &self.source {
            out += &format!("# effective configuration of {}\n", src.display());
        }
        out += &serde_saphyr::to_string(&view).expect("a config view always serializes");
        out
    }
}

/// What secrets look like in [`Config::to_yaml`]; an absent secret stays empty, so a missing
/// credential is visible.
const REDACTED: &str = "<redacted>";

fn redact(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { REDACTED }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ConfigView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec: Option<&'a str>,
    shutdown_timeout: String,
    shutdown_sync_timeout: String,
    logging: LoggingView<'a>,
    dbs: Vec<DbView>,
}

#[derive(Serialize)]
struct LoggingView<'a> {
    level: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    stderr: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct DbView {
    path: String,
    meta_path: String,
    monitor_interval: String,
    checkpoint_interval: String,
    busy_timeout: String,
    min_checkpoint_page_count: u32,
    max_checkpoint_page_count: u32,
    truncate_wal_bytes: u64,
    restore_if_db_not_exists: bool,
    verify_interval: String,
    replicas: Vec<ReplicaView>,
}

impl DbView {
    fn of(db: &DbConfig) -> DbView {
        DbView {
            path: db.path.display().to_string(),
            meta_path: db.meta_path.display().to_string(),
            monitor_interval: format_duration(db.monitor_interval),
            checkpoint_interval: format_duration(db.checkpoint_interval),
            busy_timeout: format_duration(db.busy_timeout),
            min_checkpoint_page_count: db.min_checkpoint_page_count,
            max_checkpoint_page_count: db.max_checkpoint_page_count,
            truncate_wal_bytes: db.truncate_wal_bytes,
            restore_if_db_not_exists: db.restore_if_db_not_exists,
            verify_interval: format_duration(db.verify_interval.unwrap_or_default()),
            replicas: db.replicas.iter().map(ReplicaView::of).collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ReplicaView {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    s3: Option<S3View>,
    sync_interval: String,
    snapshot_interval: String,
    retention: String,
    retention_check_interval: String,
    health_lag: String,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct S3View {
    bucket: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    region: String,
    force_path_style: bool,
    skip_verify: bool,
    access_key_id: &'static str,
    secret_access_key: &'static str,
}

impl ReplicaView {
    fn of(r: &ReplicaConfig) -> ReplicaView {
        let (path, s3) = match &r.target {
            Target::File { dir } => (dir.display().to_string(), None),
            Target::S3(c) => (
                c.prefix.clone(),
                Some(S3View {
                    bucket: c.bucket.clone(),
                    endpoint: c.endpoint.clone(),
                    region: c.region.clone(),
                    force_path_style: c.force_path_style,
                    skip_verify: c.skip_verify,
                    access_key_id: redact(&c.access_key_id),
                    secret_access_key: redact(&c.secret_access_key),
                }),
            ),
        };
        ReplicaView {
            name: r.name.clone(),
            kind: r.target.kind(),
            path,
            s3,
            sync_interval: format_duration(r.sync_interval),
            snapshot_interval: format_duration(r.snapshot_interval.unwrap_or_default()),
            retention: format_duration(r.retention.unwrap_or_default()),
            retention_check_interval: format_duration(r.retention_check_interval),
            health_lag: format_duration(r.health_lag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn durations_follow_go_syntax() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        let e = parse_duration("10").unwrap_err().to_string();
        assert!(e.contains("add a unit"), "{e}");
        assert!(parse_duration("5d").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn env_expansion_supports_defaults_and_escapes() {
        let env = env_of(&[("A", "x"), ("EMPTY", "")]);
        let e = expand_env(
            "$A ${A} ${B:-d} ${B-e} $$A ${EMPTY:-f}|${EMPTY-g}| $UNSET_X",
            &env,
        );
        assert_eq!(e.text, "x x d e $A f|| ");
        let names: Vec<&str> = e.unset.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["UNSET_X"]);
        let e = expand_env("a: 1\nb: ${NOPE}\nc: $NOPE\n", &env);
        let lines: Vec<u64> = e.unset.iter().map(|u| u.line).collect();
        assert_eq!(lines, [2, 3]);
    }

    #[test]
    fn unknown_key_names_line_and_suggestion() {
        let text =
            "dbs:\n  - path: /tmp/a.db\n    replicas:\n      - type: s3\n        bukket: b\n";
        let err = parse(text, "w.yml", &env_of(&[])).unwrap_err().to_string();
        assert_eq!(
            err,
            "w.yml:5: `bukket` is not a key; did you mean `bucket`?"
        );
    }

    #[test]
    fn s3_replica_with_endpoint_and_env_credentials() {
        let text = "dbs:\n  - path: /tmp/a.db\n    replicas:\n      - type: s3\n        bucket: b\n        path: app\n        endpoint: http://127.0.0.1:9000\n";
        let env = env_of(&[
            ("LITESTREAM_ACCESS_KEY_ID", "K"),
            ("LITESTREAM_SECRET_ACCESS_KEY", "S"),
        ]);
        let cfg = parse(text, "w.yml", &env).unwrap();
        let r = &cfg.dbs[0].replicas[0];
        assert_eq!(r.name, "s3");
        let Target::S3(s3) = &r.target else {
            panic!("not s3")
        };
        assert_eq!(s3.bucket, "b");
        assert_eq!(s3.prefix, "app");
        assert!(s3.force_path_style);
        assert_eq!(s3.access_key_id, "K");
        assert_eq!(cfg.dbs[0].meta_path, PathBuf::from("/tmp/.a.db-litestream"));
    }

    #[test]
    fn bucket_without_type_is_s3() {
        let text = "dbs:\n  - path: /tmp/a.db\n    replicas:\n      - bucket: b\n        access-key-id: K\n        secret-access-key: S\n";
        let cfg = parse(text, "w.yml", &env_of(&[])).unwrap();
        assert_eq!(cfg.dbs[0].replicas[0].target.kind(), "s3");
    }

    #[test]
    fn missing_credentials_are_left_empty_for_the_store_to_report() {
        let text = "dbs:\n  - path: /tmp/a.db\n    replicas:\n      - url: s3://b/p\n";
        let cfg = parse(text, "w.yml", &env_of(&[])).unwrap();
        let Target::S3(s3) = &cfg.dbs[0].replicas[0].target else {
            panic!("not s3")
        };
        assert!(s3.access_key_id.is_empty() && s3.secret_access_key.is_empty());
        let err = crate::storage::s3::S3Store::new(s3.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no S3 credentials for bucket b"), "{err}");
    }

    #[test]
    fn struct_keys_come_from_serde() {
        assert_eq!(Section::Snapshot.implemented(), ["interval", "retention"]);
        assert!(Section::Replica.implemented().contains(&"force-path-style"));
        assert_eq!(
            Section::with_keys(&["retention", "interval"]),
            Some(Section::Snapshot)
        );
    }

    #[test]
    fn credentials_file_profiles() {
        let text = "# comment\n[default]\naws_access_key_id = K1\naws_secret_access_key=S1\n\n\
                    [prod]\naws_access_key_id = K2\naws_secret_access_key = S2\n\
                    aws_session_token = T2\n";
        let k = |p| parse_credentials_file(text, p);
        assert_eq!(
            k("default"),
            Some((Some("K1".into()), Some("S1".into()), None))
        );
        assert_eq!(
            k("prod"),
            Some((Some("K2".into()), Some("S2".into()), Some("T2".into())))
        );
        assert_eq!(k("missing"), None);
    }

    #[test]
    fn urls() {
        let env = env_of(&[("AWS_ACCESS_KEY_ID", "K"), ("AWS_SECRET_ACCESS_KEY", "S")]);
        let r = replica_from_url("s3://bkt.localhost:8333/a/b/", &env).unwrap();
        let Target::S3(s3) = r.target else { panic!() };
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("bkt", "a/b"));
        assert_eq!(s3.endpoint.as_deref(), Some("http://localhost:8333"));
        let r = replica_from_url("s3://bkt/p?endpoint=http://127.0.0.1:1&region=x", &env).unwrap();
        let Target::S3(s3) = r.target else { panic!() };
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert!(s3.force_path_style);
        assert_eq!(s3.region, "x");
        let r = replica_from_url("s3://bkt.s3.us-west-001.backblazeb2.com/db", &env).unwrap();
        let Target::S3(s3) = r.target else { panic!() };
        assert_eq!(s3.bucket, "bkt");
        assert_eq!(s3.region, "us-west-001");
        assert_eq!(
            s3.endpoint.as_deref(),
            Some("https://s3.us-west-001.backblazeb2.com")
        );
        let r = replica_from_url("file:///var/x/../y/", &env).unwrap();
        let Target::File { dir } = r.target else {
            panic!()
        };
        assert_eq!(dir, PathBuf::from("/var/y"));
        assert!(replica_from_url("ftp://x", &env).is_err());
        assert!(replica_from_url("s3://b/p?bogus=1", &env).is_err());
    }
}
