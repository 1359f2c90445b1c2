//! A replica in an S3-compatible bucket, through the `rust-s3` crate.
//!
//! Each call makes one attempt: rust-s3's own (process-wide) retries are set to zero because
//! they never cover PUT or DELETE, and [`super::Retrying`] owns the policy for every operation.
//! Failures are mapped to [`StorageError`] from the S3 XML error `Code`, never from the raw
//! body, because S3 error bodies can echo the signed request (including a session token).
//!
//! Credentials are static only: nothing here consults the environment, profile files or the EC2
//! metadata service, so a misconfiguration fails fast instead of hanging on 169.254.169.254.
//!
//! TLS: rust-s3 builds its own reqwest client and offers no hook for extra root certificates.
//! Walden enables reqwest's `rustls-tls-native-roots` feature (Cargo feature unification reaches
//! rust-s3's reqwest), so the client trusts Mozilla's roots (from rust-s3's defaults) plus the
//! system store that `rustls-native-certs` reads, which honours `SSL_CERT_FILE`/`SSL_CERT_DIR`.
//! [`trust_aws_ca_bundle`] maps the AWS SDK convention `AWS_CA_BUNDLE` onto those variables.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use s3::Region;
use s3::bucket::Bucket;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::{ObjectIdentifier, Part};
use tokio::io::AsyncReadExt;

use futures::StreamExt;

use super::{Body, ByteStream, Entry, Listing, ObjectStore, StorageError, key_parts};

/// `Body::File` uploads larger than this use a multipart upload, streamed part by part.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;

/// Smallest multipart part; one part is in memory at a time.
const PART_SIZE: u64 = 8 * 1024 * 1024;

/// S3 allows at most 10,000 parts per upload; parts grow for files beyond 80 GB.
const MAX_PARTS: u64 = 10_000;

/// DeleteObjects accepts at most 1,000 keys per request.
const DELETE_BATCH: usize = 1000;

/// A last-resort bound on one HTTP request (including its body), against connections that hang
/// forever; the retry policy's per-attempt timeout is the one to tune.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Where and how to reach a bucket.
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of the replica, used as given apart from trailing slashes (Litestream keeps a
    /// leading `/` from a config `path`, and so does Walden).
    pub prefix: String,
    /// For example `http://127.0.0.1:8333`; without a scheme, https is used. `None` means AWS.
    pub endpoint: Option<String>,
    /// Empty means `us-east-1`.
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub force_path_style: bool,
    /// Accept any certificate and host name (self-signed test servers only).
    pub skip_verify: bool,
}

/// Written by hand so that no credential reaches a log line.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &"[redacted]")
            .field("secret_access_key", &"[redacted]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[redacted]"),
            )
            .field("force_path_style", &self.force_path_style)
            .field("skip_verify", &self.skip_verify)
            .finish()
    }
}

/// An [`ObjectStore`] in an S3 bucket under a key prefix.
pub struct S3Store {
    bucket: Box<Bucket>,
    name: String,
    prefix: String,
    /// "endpoint URL" or "region NAME", for `describe`.
    location: String,
    /// The URL requests go to, for connection errors.
    endpoint: String,
}

/// Written by hand: the bucket handle holds the credentials.
impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.name)
            .field("prefix", &self.prefix)
            .field("location", &self.location)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What makes two replicas' clients interchangeable. Holds the secret only to compare it; it
/// is never printed (no `Debug`).
#[derive(PartialEq, Eq, Hash)]
struct ClientKey {
    bucket: String,
    endpoint: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    force_path_style: bool,
    skip_verify: bool,
}

/// One rust-s3 client per distinct connection setting, shared by every replica that uses it
/// (a clone shares the underlying reqwest client). Each client parses the whole root
/// certificate store and keeps its own connection pool: with one per replica, a thousand
/// databases replicating to the same bucket held a thousand copies, about a megabyte each.
static CLIENTS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<ClientKey, Box<Bucket>>>,
> = std::sync::LazyLock::new(Default::default);

fn config_error(message: impl Into<String>) -> StorageError {
    StorageError::Config {
        message: message.into(),
    }
}

impl S3Store {
    /// A store with its own HTTP client.
    pub fn new(cfg: S3Config) -> Result<S3Store, StorageError> {
        S3Store::build(cfg, false)
    }

    /// A store sharing its HTTP client with every other store of the same connection settings
    /// (see [`CLIENTS`]). Pooled connections belong to the tokio runtime that opened them, so
    /// this is for a process with one runtime, as the `walden` binary is.
    pub fn shared(cfg: S3Config) -> Result<S3Store, StorageError> {
        S3Store::build(cfg, true)
    }

    fn build(cfg: S3Config, share: bool) -> Result<S3Store, StorageError> {
        if cfg.bucket.is_empty() {
            return Err(config_error("s3 replica needs a bucket name"));
        }
        if cfg.access_key_id.is_empty() || cfg.secret_access_key.is_empty() {
            return Err(config_error(format!(
                "no S3 credentials for bucket {}: set access-key-id and secret-access-key in the \
                 config, or LITESTREAM_ACCESS_KEY_ID and LITESTREAM_SECRET_ACCESS_KEY, or \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                cfg.bucket
            )));
        }
        let region_name = if cfg.region.is_empty() {
            "us-east-1".to_owned()
        } else {
            cfg.region.clone()
        };
        let (region, location) = match cfg.endpoint.as_deref().map(str::trim) {
            Some(endpoint) if !endpoint.is_empty() => {
                let endpoint = if endpoint.contains("://") {
                    endpoint.trim_end_matches('/').to_owned()
                } else {
                    format!("https://{}", endpoint.trim_end_matches('/'))
                };
                let region = Region::Custom {
                    region: region_name,
                    endpoint: endpoint.clone(),
                };
                (region, format!("endpoint {endpoint}"))
            }
            _ => {
                let region = match region_name.parse::<Region>() {
                    // rust-s3 would use an unknown name as the host name itself.
                    Ok(Region::Custom { .. }) | Err(_) => Region::Custom {
                        endpoint: format!("https://s3.{region_name}.amazonaws.com"),
                        region: region_name.clone(),
                    },
                    Ok(known) => known,
                };
                (region, format!("region {region_name}"))
            }
        };
        let endpoint = format!("{}://{}", region.scheme(), region.host());
        let credentials = Credentials::new(
            Some(&cfg.access_key_id),
            Some(&cfg.secret_access_key),
            cfg.session_token.as_deref(),
            None,
            None,
        )
        .map_err(|e| config_error(format!("s3 credentials: {e}")))?;

        s3::set_retries(0);
        let key = ClientKey {
            bucket: cfg.bucket.clone(),
            endpoint: endpoint.clone(),
            region: format!("{region}"),
            access_key_id: cfg.access_key_id.clone(),
            secret_access_key: cfg.secret_access_key.clone(),
            session_token: cfg.session_token.clone(),
            force_path_style: cfg.force_path_style,
            skip_verify: cfg.skip_verify,
        };
        let build = |e: S3Error| config_error(format!("s3 client for bucket {}: {e}", cfg.bucket));
        let make = || -> Result<Box<Bucket>, StorageError> {
            let mut bucket = Bucket::new(&cfg.bucket, region, credentials).map_err(build)?;
            if cfg.force_path_style {
                bucket = bucket.with_path_style();
            }
            bucket = bucket
                .with_request_timeout(REQUEST_TIMEOUT)
                .map_err(build)?;
            if cfg.skip_verify {
                bucket = Box::new(bucket.set_dangerous_config(true, true).map_err(build)?);
            }
            Ok(bucket)
        };
        let bucket = if share {
            let mut clients = CLIENTS.lock().expect("client cache lock");
            match clients.get(&key) {
                Some(bucket) => bucket.clone(),
                None => {
                    let bucket = make()?;
                    clients.insert(key, bucket.clone());
                    bucket
                }
            }
        } else {
            make()?
        };
        Ok(S3Store {
            bucket,
            name: cfg.bucket,
            prefix: cfg.prefix.trim_end_matches('/').to_owned(),
            location,
            endpoint,
        })
    }

    /// The full object key: the prefix and the cleaned relative key joined with `/`.
    fn full_key(&self, key: &str) -> Result<String, StorageError> {
        let parts = key_parts(key)?;
        if parts.is_empty() {
            return Err(StorageError::InvalidKey {
                key: key.to_owned(),
                reason: "an object key needs a name".to_owned(),
            });
        }
        Ok(self.join(&parts))
    }

    fn join(&self, parts: &[&str]) -> String {
        let rel = parts.join("/");
        match (self.prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel,
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{rel}", self.prefix),
        }
    }

    /// The key as rust-s3 expects it: it strips exactly one leading `/`, so adding one keeps a
    /// prefix that itself starts with `/` intact.
    fn request_path(full_key: &str) -> String {
        format!("/{full_key}")
    }

    /// The listing prefix of a directory: its full key and a trailing `/`, or nothing for the
    /// bucket root.
    fn dir_prefix(&self, dir: &str) -> Result<String, StorageError> {
        let joined = self.join(&key_parts(dir)?);
        Ok(if joined.is_empty() {
            joined
        } else {
            format!("{joined}/")
        })
    }

    fn error(&self, err: S3Error, key: Option<&str>) -> StorageError {
        map_error(err, &self.name, &self.endpoint, key)
    }

    async fn put_multipart(
        &self,
        path: &str,
        mut file: tokio::fs::File,
        len: u64,
    ) -> Result<(), StorageError> {
        const CONTENT_TYPE: &str = "application/octet-stream";
        let part_size = PART_SIZE.max(len.div_ceil(MAX_PARTS - 1));
        let upload = self
            .bucket
            .initiate_multipart_upload(path, CONTENT_TYPE)
            .await
            .map_err(|e| self.error(e, Some(path)))?;
        let uploaded: Result<(), StorageError> = async {
            let mut parts = Vec::new();
            loop {
                let mut chunk = Vec::with_capacity(part_size as usize);
                (&mut file)
                    .take(part_size)
                    .read_to_end(&mut chunk)
                    .await
                    .map_err(|e| StorageError::io("read upload source", e))?;
                // A file that ends exactly on a part boundary still needs at least one part.
                if chunk.is_empty() && !parts.is_empty() {
                    break;
                }
                let number = parts.len() as u32 + 1;
                let last = (chunk.len() as u64) < part_size;
                let part: Part = self
                    .bucket
                    .put_multipart_chunk(chunk, path, number, &upload.upload_id, CONTENT_TYPE)
                    .await
                    .map_err(|e| self.error(e, Some(path)))?;
                parts.push(part);
                if last {
                    break;
                }
            }
            self.bucket
                .complete_multipart_upload(path, &upload.upload_id, parts)
                .await
                .map_err(|e| self.error(e, Some(path)))?;
            Ok(())
        }
        .await;
        if uploaded.is_err() {
            // Best effort: the upload's own error is the one to report, and an orphaned upload
            // only costs storage until the bucket's lifecycle rules clean it up.
            let _ = self.bucket.abort_upload(path, &upload.upload_id).await;
        }
        uploaded
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{} ({})", self.name, self.location)
        } else {
            format!("s3://{}/{} ({})", self.name, self.prefix, self.location)
        }
    }

    async fn list(&self, dir: &str) -> Result<Listing, StorageError> {
        let prefix = self.dir_prefix(dir)?;
        let mut listing = Listing::default();
        let mut token = None;
        loop {
            let (page, _) = self
                .bucket
                .list_page(prefix.clone(), Some("/".to_owned()), token, None, None)
                .await
                .map_err(|e| self.error(e, None))?;
            for common in page.common_prefixes.unwrap_or_default() {
                let name = common
                    .prefix
                    .strip_prefix(&prefix)
                    .unwrap_or(&common.prefix)
                    .trim_end_matches('/');
                if !name.is_empty() {
                    listing.dirs.push(name.to_owned());
                }
            }
            for object in page.contents {
                let Some(name) = object.key.strip_prefix(&prefix) else {
                    continue;
                };
                // An empty name is a "directory marker" object some tools create.
                if name.is_empty() || name.contains('/') {
                    continue;
                }
                listing.objects.push(Entry {
                    name: name.to_owned(),
                    size: object.size,
                    modified: parse_last_modified(&object.last_modified)?,
                });
            }
            match page.next_continuation_token {
                Some(next) if page.is_truncated => token = Some(next),
                _ => break,
            }
        }
        listing.dirs.sort();
        listing.dirs.dedup();
        listing.objects.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listing)
    }

    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError> {
        let path = Self::request_path(&self.full_key(key)?);
        match body {
            Body::Bytes(bytes) => {
                self.bucket
                    .put_object(&path, &bytes)
                    .await
                    .map_err(|e| self.error(e, Some(key)))?;
            }
            Body::File(src) => {
                let mut file = tokio::fs::File::open(&src).await.map_err(|e| {
                    StorageError::io(format!("open upload source {}", src.display()), e)
                })?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| {
                        StorageError::io(format!("stat upload source {}", src.display()), e)
                    })?
                    .len();
                if len > MULTIPART_THRESHOLD {
                    self.put_multipart(&path, file, len).await?;
                } else {
                    let mut content = Vec::with_capacity(len as usize);
                    file.read_to_end(&mut content).await.map_err(|e| {
                        StorageError::io(format!("read upload source {}", src.display()), e)
                    })?;
                    self.bucket
                        .put_object(&path, &content)
                        .await
                        .map_err(|e| self.error(e, Some(key)))?;
                }
            }
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = Self::request_path(&self.full_key(key)?);
        let response = self
            .bucket
            .get_object(&path)
            .await
            .map_err(|e| self.error(e, Some(key)))?;
        Ok(response.bytes().clone())
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let path = Self::request_path(&self.full_key(key)?);
        let response = self
            .bucket
            .get_object_stream(&path)
            .await
            .map_err(|e| self.error(e, Some(key)))?;
        let name = self.name.clone();
        Ok(Box::pin(response.bytes.map(move |chunk| {
            chunk.map_err(|e| StorageError::Protocol {
                message: format!("download from {name} cut short: {e}"),
            })
        })))
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let objects = keys
            .iter()
            .map(|k| {
                Ok(ObjectIdentifier::new(Self::request_path(
                    &self.full_key(k)?,
                )))
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        for batch in objects.chunks(DELETE_BATCH) {
            let result = self
                .bucket
                .delete_objects(batch.to_vec())
                .await
                .map_err(|e| self.error(e, None))?;
            if let Some(failed) = result.errors.iter().find(|e| e.code != "NoSuchKey") {
                return Err(classify(
                    500,
                    &failed.code,
                    &format!("deleting {}: {}", failed.key, failed.message),
                    &self.name,
                    None,
                ));
            }
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), StorageError> {
        let prefix = self.dir_prefix("")?;
        self.bucket
            .list_page(prefix, Some("/".to_owned()), None, None, Some(1))
            .await
            .map_err(|e| self.error(e, None))?;
        Ok(())
    }
}

fn parse_last_modified(text: &str) -> Result<SystemTime, StorageError> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| StorageError::Protocol {
            message: format!("listing has an unreadable LastModified {text:?}: {e}"),
        })
}

/// The text of the first `<tag>…</tag>` element in an S3 XML error body.
fn xml_element<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(body[start..end].trim())
}

/// Maps an S3 error code and status to the typed error; `message` must not contain anything the
/// server echoed from the request apart from the `Message` element.
fn classify(
    status: u16,
    code: &str,
    message: &str,
    bucket: &str,
    key: Option<&str>,
) -> StorageError {
    match code {
        "NoSuchBucket" => StorageError::NoSuchBucket {
            bucket: bucket.to_owned(),
        },
        "NoSuchKey" => StorageError::NotFound {
            key: key.unwrap_or_default().to_owned(),
        },
        "SignatureDoesNotMatch"
        | "InvalidAccessKeyId"
        | "AccessDenied"
        | "InvalidToken"
        | "ExpiredToken"
        | "TokenRefreshRequired"
        | "AuthorizationHeaderMalformed" => StorageError::Unauthorized {
            code: code.to_owned(),
            message: message.to_owned(),
        },
        // A skewed clock is a 403 too, but new credentials would not help.
        "RequestTimeTooSkewed" => StorageError::Server {
            status,
            code: code.to_owned(),
            message: format!("{message}; check the system clock"),
        },
        _ if status == 401 || status == 403 => StorageError::Unauthorized {
            code: code.to_owned(),
            message: message.to_owned(),
        },
        _ if status == 404 && key.is_some() => StorageError::NotFound {
            key: key.unwrap_or_default().to_owned(),
        },
        _ => StorageError::Server {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
        },
    }
}

/// The error and its sources, e.g. "error sending request: client error (Connect): tcp connect
/// error: Connection refused (os error 111)".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn map_error(err: S3Error, bucket: &str, endpoint: &str, key: Option<&str>) -> StorageError {
    match err {
        S3Error::HttpFailWithBody(status, body) => {
            let code = xml_element(&body, "Code").unwrap_or_default();
            let message =
                xml_element(&body, "Message").unwrap_or("no error message in the response");
            classify(status, code, message, bucket, key)
        }
        S3Error::HttpFail => classify(0, "", "request failed without a response body", bucket, key),
        S3Error::Reqwest(e) if e.is_timeout() => StorageError::Timeout {
            operation: format!("s3 request to {endpoint}"),
            after: REQUEST_TIMEOUT,
        },
        S3Error::Reqwest(e) if e.is_connect() => StorageError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: error_chain(&e),
        },
        S3Error::Reqwest(e) => StorageError::Protocol {
            message: error_chain(&e),
        },
        S3Error::Io(e) => StorageError::io("s3 transfer", e),
        S3Error::Credentials(e) => config_error(format!("s3 credentials: {e}")),
        S3Error::Region(e) => config_error(format!("s3 region: {e}")),
        S3Error::UrlParse(e) => config_error(format!("s3 endpoint url: {e}")),
        other => StorageError::Protocol {
            message: other.to_string(),
        },
    }
}

/// Makes the TLS client trust the certificates in `AWS_CA_BUNDLE` in addition to the system
/// roots, the way the AWS SDKs do.
///
/// It sets `SSL_CERT_FILE` to the bundle and, unless already set, `SSL_CERT_DIR` to the system
/// certificate directories, because `rustls-native-certs` reads only those variables when either
/// is present. An explicit `SSL_CERT_FILE` wins and the bundle is then left alone. Mapping the
/// variables is the least intrusive way in: rust-s3 builds its reqwest client itself, with no
/// hook for root certificates.
///
/// Returns a configuration error if the bundle cannot be read or holds no certificate, so a typo
/// fails at startup instead of as a TLS error at the first upload.
///
/// # Safety
///
/// It changes the process environment, so it must run while the process has one thread: first
/// thing in `main`, before the tokio runtime starts.
pub unsafe fn trust_aws_ca_bundle() -> Result<(), StorageError> {
    let Some(bundle) = std::env::var_os("AWS_CA_BUNDLE").filter(|b| !b.is_empty()) else {
        return Ok(());
    };
    let loaded = rustls_native_certs::load_certs_from_paths(Some(Path::new(&bundle)), None);
    if let Some(err) = loaded.errors.first() {
        return Err(config_error(format!(
            "AWS_CA_BUNDLE {}: {err}",
            Path::new(&bundle).display()
        )));
    }
    if loaded.certs.is_empty() {
        return Err(config_error(format!(
            "AWS_CA_BUNDLE {} holds no certificate",
            Path::new(&bundle).display()
        )));
    }
    if std::env::var_os("SSL_CERT_FILE").is_some() {
        return Ok(());
    }
    let dir_set = std::env::var_os("SSL_CERT_DIR").is_some();
    let system = if dir_set {
        Vec::new()
    } else {
        system_cert_dirs(openssl_probe::probe())
    };
    for (name, value) in ca_bundle_env(bundle, system) {
        // SAFETY: the caller guarantees that no other thread exists.
        unsafe { std::env::set_var(name, value) };
    }
    Ok(())
}

/// The directories that hold the system's trusted certificates: the probed certificate
/// directories and the directory of the probed bundle file.
fn system_cert_dirs(probe: openssl_probe::ProbeResult) -> Vec<PathBuf> {
    let mut dirs = probe.cert_dir;
    if let Some(parent) = probe.cert_file.as_deref().and_then(Path::parent) {
        dirs.push(parent.to_owned());
    }
    dirs.dedup();
    dirs
}

fn ca_bundle_env(bundle: OsString, system_dirs: Vec<PathBuf>) -> Vec<(&'static str, OsString)> {
    let mut vars = vec![("SSL_CERT_FILE", bundle)];
    if let Ok(dirs) = std::env::join_paths(&system_dirs)
        && !system_dirs.is_empty()
    {
        vars.push(("SSL_CERT_DIR", dirs));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> S3Config {
        S3Config {
            bucket: "bkt".to_owned(),
            prefix: "db/".to_owned(),
            endpoint: Some("127.0.0.1:9".to_owned()),
            region: String::new(),
            access_key_id: "AKIDEXAMPLE".to_owned(),
            secret_access_key: "wJalrXUtnFEMI-very-secret".to_owned(),
            session_token: Some("session-token-secret".to_owned()),
            force_path_style: true,
            skip_verify: false,
        }
    }

    #[test]
    fn debug_and_describe_hide_credentials() {
        let cfg = config();
        let debug = format!("{cfg:?}");
        let store = S3Store::new(cfg).unwrap();
        let shown = format!("{debug} {store:?} {}", store.describe());
        for secret in ["AKIDEXAMPLE", "very-secret", "session-token-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(
            store.describe(),
            "s3://bkt/db (endpoint https://127.0.0.1:9)"
        );
    }

    #[test]
    fn keys_join_the_prefix_like_path_join() {
        let store = S3Store::new(config()).unwrap();
        assert_eq!(
            store.full_key("generations//ab/./x").unwrap(),
            "db/generations/ab/x"
        );
        assert_eq!(store.dir_prefix("").unwrap(), "db/");
        assert_eq!(store.dir_prefix("generations/").unwrap(), "db/generations/");

        let rooted = S3Store::new(S3Config {
            prefix: "/db".to_owned(),
            ..config()
        })
        .unwrap();
        assert_eq!(
            S3Store::request_path(&rooted.full_key("a").unwrap()),
            "//db/a"
        );

        let bare = S3Store::new(S3Config {
            prefix: String::new(),
            ..config()
        })
        .unwrap();
        assert_eq!(bare.dir_prefix("").unwrap(), "");
        assert_eq!(bare.dir_prefix("generations").unwrap(), "generations/");
    }

    #[test]
    fn missing_credentials_are_a_config_error() {
        let err = S3Store::new(S3Config {
            secret_access_key: String::new(),
            ..config()
        })
        .unwrap_err();
        assert!(matches!(err, StorageError::Config { .. }));
    }

    #[test]
    fn error_codes_map_to_typed_errors() {
        let body = |code: &str| {
            format!(
                "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>nope</Message>\
                 <StringToSign>AWS4-HMAC-SHA256 secret-ish</StringToSign></Error>"
            )
        };
        let map = |status, code: &str, key| {
            map_error(
                S3Error::HttpFailWithBody(status, body(code)),
                "bkt",
                "endpoint x",
                key,
            )
        };
        assert!(
            matches!(map(404, "NoSuchBucket", None), StorageError::NoSuchBucket { bucket } if bucket == "bkt")
        );
        assert!(
            matches!(map(404, "NoSuchKey", Some("k")), StorageError::NotFound { key } if key == "k")
        );
        for code in [
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        ] {
            let err = map(403, code, None);
            assert!(matches!(err, StorageError::Unauthorized { .. }), "{err}");
            assert!(err.is_permanent());
            assert!(!err.to_string().contains("secret-ish"));
        }
        let slow = map(503, "SlowDown", None);
        assert!(matches!(slow, StorageError::Server { status: 503, .. }));
        assert!(!slow.is_permanent());
        let head = map_error(
            S3Error::HttpFailWithBody(404, String::new()),
            "bkt",
            "endpoint x",
            Some("k"),
        );
        assert!(matches!(head, StorageError::NotFound { .. }));
    }

    #[test]
    fn last_modified_parses_with_and_without_fraction() {
        let a = parse_last_modified("2026-11-22T10:00:00.000Z").unwrap();
        let b = parse_last_modified("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(a, b);
        assert!(parse_last_modified("yesterday").is_err());
    }

    #[test]
    fn ca_bundle_keeps_system_dirs() {
        let probe = openssl_probe::ProbeResult {
            cert_file: Some(PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt")),
            cert_dir: vec![PathBuf::from("/etc/ssl/certs")],
        };
        let vars = ca_bundle_env(OsString::from("/opt/corp-ca.pem"), system_cert_dirs(probe));
        assert_eq!(
            vars,
            [
                ("SSL_CERT_FILE", OsString::from("/opt/corp-ca.pem")),
                (
                    "SSL_CERT_DIR",
                    OsString::from("/etc/ssl/certs:/etc/pki/tls/certs")
                ),
            ]
        );
        assert_eq!(ca_bundle_env(OsString::from("/b"), Vec::new()).len(), 1);
    }
}
