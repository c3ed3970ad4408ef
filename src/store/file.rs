//! The embedded file store: hashed key records in a TOML file, for a first run with no Redis
//! and for small sidecars whose keys are mounted from a Kubernetes Secret.
//!
//! The file holds one `[[keys]]` table per key and one `[[service_accounts]]` table per service
//! account (see the README for the fields); never a plaintext key. The audit trail is a JSON
//! lines file beside it, `<file>.audit.jsonl`, appended to (`O_APPEND`, one write per entry). The whole set lives in memory; lookups take a read lock for a hash-map probe.
//!
//! - Reload: a filesystem watcher on the file's directory reacts to events about the keys file
//!   and Kubernetes' `..data` symlink swap, and to nothing else there (logs, the audit trail).
//!   A rename onto the file (how the CLI and the admin API write it, and the swap) and SIGHUP
//!   reload at once; an in-place write reloads once the file was quiet for 50 ms, and at
//!   most 250 ms after its first event however busy the file is. A file that fails
//!   to parse or validate keeps the last good set serving; the error, naming the line, is
//!   logged and shown by `/readyz`. A good reload reports every key whose record changed,
//!   appeared or disappeared to the invalidation sink, which evicts their cached verdicts.
//! - Writes (the key-management commands): under an exclusive lock on `<file>.lock`, the file
//!   is re-read, edited with `toml_edit` (comments and layout survive), written to a temporary
//!   file, fsynced and renamed over the original. A crash leaves the old or the new file, never
//!   half of one, and concurrent writers never lose each other's keys. A write made in a
//!   running server (the admin API) adopts the file it wrote and reports to the invalidation
//!   sink itself every key whose record differs from the set it was serving: its own changes
//!   and those another process made since the last reload (the watcher's reload, finding the
//!   set already adopted, sees no change left to report).
//! - Order: reloads and writes adopt their sets in the order they read the file, so the served
//!   set never goes back to a file older than one already served.
//! - Read-only: a keys file this process cannot write (a Kubernetes Secret, mounted read-only;
//!   no write permission on the file or its directory; an immutable file), noticed at open, at
//!   every reload and whenever a write fails with EROFS, EACCES or EPERM, is served as usual,
//!   but last-used times are then kept in memory only (still shown by this instance) instead
//!   of failing to be written every interval, and key-management writes fail with an error
//!   naming the file. `/readyz` warns of it and `keygate_file_store_read_only` is 1.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    format_time, AuditEntry, InvalidationSink, KeyRecord, OldKeys, ServiceAccount, Store,
    StoreError,
};
use crate::key::{KeyDigest, KeyKind};

/// Quiet time after the last event of an in-place write before reloading: editors and shells
/// write a file in bursts.
const QUIET: Duration = Duration::from_millis(50);
/// Longest a reload waits from the first event of a burst, however busy the file is.
const MAX_DEBOUNCE: Duration = Duration::from_millis(250);
/// The name Kubernetes gives the symlink it swaps to update a mounted Secret or ConfigMap.
const K8S_DATA: &str = "..data";

/// A [`Store`] backed by a TOML file.
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    set: RwLock<Arc<KeySet>>,
    /// The error of the last reload, if it failed (the last good set is still served).
    reload_error: Mutex<Option<String>>,
    /// Where this process's own writes report changed keys, once serving.
    sink: OnceLock<Arc<dyn InvalidationSink>>,
    /// Last-used times by key id, kept in `<file>.last-used.json` rather than in the keys
    /// file, so recording them never rewrites (or reloads) the keys.
    last_used: Mutex<HashMap<String, u64>>,
    /// Why the keys file cannot be written, while it cannot (see [`unwritable`]): last-used
    /// times are then kept in `last_used` only, and key-management writes are refused.
    read_only: Mutex<Option<String>>,
    /// Held from a reload's or a write's read of the file until it has adopted the result
    /// (see [`Inner::adopt`]).
    apply: Mutex<()>,
    /// Called at the points of [`Point`], so unit tests can stop a thread there.
    #[cfg(test)]
    hook: OnceLock<Box<dyn Fn(Point) + Send + Sync>>,
}

/// Where [`Inner::hook`] is called.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// A reload has read the file and not yet adopted it.
    ReloadRead,
    /// A reload or a write waits for another one to adopt its set.
    ApplyContended,
}

#[derive(Default, PartialEq, Debug)]
struct KeySet {
    by_digest: HashMap<KeyDigest, KeyRecord>,
    /// Digests in file order, for listing.
    order: Vec<KeyDigest>,
    /// Service accounts in file order.
    accounts: Vec<ServiceAccount>,
}

impl KeySet {
    fn by_id(&self, id: &str) -> Option<&KeyRecord> {
        self.order
            .iter()
            .filter_map(|d| self.by_digest.get(d))
            .find(|r| r.id == id)
    }

    fn account(&self, id: &str) -> Option<&ServiceAccount> {
        self.accounts.iter().find(|a| a.id == id)
    }

    /// The keys of an account: service account keys whose subject is the account's id.
    fn account_keys<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a KeyRecord> {
        self.order
            .iter()
            .filter_map(|d| self.by_digest.get(d))
            .filter(move |r| r.kind == KeyKind::ServiceAccount && r.subject == id)
    }
}

impl FileStore {
    /// Loads the file. A missing file is an empty set when `create` is set, else an error.
    pub fn open(path: &Path, create: bool) -> Result<Self, StoreError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => String::new(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Unavailable(format!(
                    "keys file {} does not exist; create a key with `keygate keys create --keys-file {}`",
                    path.display(),
                    path.display()
                )))
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot read keys file {}: {e}",
                    path.display()
                )))
            }
        };
        let set =
            parse(&text).map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
        // Last-used times are bookkeeping: an unreadable file only loses them.
        let last_used = fs::read(last_used_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(FileStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                set: RwLock::new(Arc::new(set)),
                reload_error: Mutex::new(None),
                sink: OnceLock::new(),
                last_used: Mutex::new(last_used),
                read_only: Mutex::new(unwritable(path)),
                apply: Mutex::new(()),
                #[cfg(test)]
                hook: OnceLock::new(),
            }),
        })
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.inner.set.read().expect("key set lock").clone()
    }

    /// A record with its last-used time filled in.
    fn with_last_used(&self, r: &KeyRecord) -> KeyRecord {
        let mut r = r.clone();
        r.last_used_at = self
            .inner
            .last_used
            .lock()
            .expect("last used lock")
            .get(&r.id)
            .copied();
        r
    }

    /// Applies an edit off the runtime threads, then evicts the cached verdict of every key it
    /// changed in this process (other processes see the file change through their watcher).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut toml_edit::DocumentMut, &KeySet) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (out, changed) = self.blocking(move |inner| inner.edit(f)).await?;
        if let Some(sink) = self.inner.sink.get() {
            for d in &changed {
                sink.invalidate(d).await;
            }
        }
        Ok(out)
    }

    /// The audit trail's file, beside the keys file.
    fn audit_path(&self) -> PathBuf {
        with_suffix(&self.inner.path, ".audit.jsonl")
    }

    /// Runs a blocking file operation off the runtime threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("file task failed: {e}")))?
    }
}

impl Inner {
    #[cfg(test)]
    fn hook(&self, point: Point) {
        if let Some(h) = self.hook.get() {
            h(point)
        }
    }

    /// Re-reads the file; on success swaps the set in and returns the digests that changed.
    /// Looks again whether the file can be written, too (a change of its mode is an event).
    fn reload(&self) -> Result<Vec<KeyDigest>, StoreError> {
        self.note_writable(unwritable(&self.path));
        let applying = self.lock_apply();
        let result = fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| parse(&text));
        #[cfg(test)]
        self.hook(Point::ReloadRead);
        let new = match result {
            Ok(set) => set,
            Err(e) => {
                let msg = format!("{}: {e}", self.path.display());
                *self.reload_error.lock().expect("error lock") = Some(msg.clone());
                return Err(StoreError::Corrupt(msg));
            }
        };
        *self.reload_error.lock().expect("error lock") = None;
        Ok(self.adopt(&applying, new))
    }

    /// Records whether the keys file can be written (`None`) or why not; in a serving process,
    /// logs each change.
    fn note_writable(&self, why: Option<String>) {
        let mut read_only = self
            .read_only
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.sink.get().is_some() {
            match (&*read_only, &why) {
                (None, Some(why)) => warn_read_only(&self.path, why),
                (Some(_), None) => tracing::info!(
                    file = %self.path.display(),
                    "keys file writable again: last-used times are persisted"
                ),
                _ => {}
            }
        }
        *read_only = why;
    }

    /// The error of a write refused because the keys file is read-only.
    fn read_only_error(&self, why: &str) -> StoreError {
        StoreError::ReadOnly(format!(
            "keys file {} is read-only ({why}); change its keys where it is writable (for a Kubernetes Secret: update the Secret)",
            self.path.display()
        ))
    }

    /// Takes the lock that orders every adoption of a set after the file read it came from.
    fn lock_apply(&self) -> MutexGuard<'_, ()> {
        #[cfg(test)]
        match self.apply.try_lock() {
            Ok(guard) => return guard,
            Err(std::sync::TryLockError::WouldBlock) => self.hook(Point::ApplyContended),
            Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
        }
        // It guards no data: a thread that panicked holding it left nothing half done.
        self.apply.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves `new` and returns the digests whose record differs from the set served until
    /// now: the changes this process has not yet reported, whoever made them.
    ///
    /// Invariant (the served set only moves forward): it is called with `apply` held since
    /// before the file was read, so sets are adopted in the order their files were read, and
    /// a reload that read the file before a write can never replace the write's set after it.
    /// Diffing against the served set, not against the file a write started from, is what
    /// reports another process's change that a write adopts before the watcher reloads it.
    /// Tested by `a_reload_that_read_the_file_before_a_write_never_adopts_it_after_the_write`
    /// and `an_edit_reports_what_another_writer_changed_since_the_last_reload`.
    fn adopt(&self, _applying: &MutexGuard<'_, ()>, new: KeySet) -> Vec<KeyDigest> {
        // Only adoptions replace the set, and `apply` admits one at a time: the diff can run on
        // a snapshot, and lookups wait for the pointer swap alone, never for the diff or for
        // freeing the old set (dropped with `served`, after the lock).
        let served = self.set.read().expect("key set lock").clone();
        let changed = diff(&served, &new);
        *self.set.write().expect("key set lock") = Arc::new(new);
        changed
    }

    /// Applies an edit to the file under the writers' lock, atomically, and adopts the result;
    /// returns the edit's result and the digests of the keys whose records changed since the
    /// set this process served (so including other processes' changes not yet reloaded).
    fn edit<T>(
        &self,
        f: impl FnOnce(&mut toml_edit::DocumentMut, &KeySet) -> Result<T, StoreError>,
    ) -> Result<(T, Vec<KeyDigest>), StoreError> {
        if let Some(why) = unwritable(&self.path) {
            let e = self.read_only_error(&why);
            self.note_writable(Some(why));
            return Err(e);
        }
        let io = |what: &str, e: std::io::Error| {
            if is_read_only(&e) {
                let why = format!("{what} {}: {e}", self.path.display());
                let refused = self.read_only_error(&why);
                self.note_writable(Some(why));
                return refused;
            }
            StoreError::Unavailable(format!("{what} {}: {e}", self.path.display()))
        };
        let lock_path = with_suffix(&self.path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io("cannot open the lock file of", e))?;
        lock.lock().map_err(|e| io("cannot lock", e))?;
        let applying = self.lock_apply();

        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("cannot read", e)),
        };
        let current = parse(&text).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: {e}; fix it before writing",
                self.path.display()
            ))
        })?;
        let mut doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", self.path.display())))?;
        if text.is_empty() {
            doc.decor_mut()
                .set_prefix("# keygate keys file: hashed key records, never plaintext keys.\n# Edit by hand or with `keygate keys …`; keygate reloads it on change.\n\n");
        }
        let out = f(&mut doc, &current)?;
        let new_text = doc.to_string();
        let new_set = parse(&new_text)
            .map_err(|e| StoreError::Corrupt(format!("edit produced an invalid file: {e}")))?;
        write_atomically(&self.path, new_text.as_bytes()).map_err(|e| io("cannot write", e))?;
        let changed = self.adopt(&applying, new_set);
        drop(applying);
        drop(lock);
        Ok((out, changed))
    }
}

fn last_used_path(path: &Path) -> PathBuf {
    with_suffix(path, ".last-used.json")
}

/// The directory the keys file is in (where its temporary files and renames happen).
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether an IO error says the file cannot be written by this process, however often it is
/// tried: a read-only mount, no permission, an immutable file.
fn is_read_only(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EROFS | libc::EACCES | libc::EPERM)
    )
}

/// Why this process cannot write the keys file, if it cannot: the file (if it exists) or its
/// directory is not writable. Asked of the kernel with the effective ids
/// (`faccessat(AT_EACCESS)`), which reports a read-only mount (EROFS) and an immutable file
/// (EPERM) to root too, who is not held by permission bits. Other errors (a missing
/// directory) are left for the write itself to report.
fn unwritable(path: &Path) -> Option<String> {
    [path, dir_of(path)].into_iter().find_map(|p| {
        let c = CString::new(p.as_os_str().as_bytes()).ok()?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call, which only reads it.
        let r =
            unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) };
        let e = std::io::Error::last_os_error();
        (r != 0 && is_read_only(&e)).then(|| format!("{}: {e}", p.display()))
    })
}

fn warn_read_only(path: &Path, why: &str) {
    tracing::warn!(
        file = %path.display(),
        reason = why,
        "keys file is read-only: last-used times are not persisted (kept in this instance's memory only), and keys cannot be managed through this instance"
    );
}

/// What a filesystem event in the keys file's directory asks of the watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reaction {
    /// Not about the keys file: other files in the directory (logs, keygate's own audit trail,
    /// last-used times, lock and temporary files), and reads.
    Ignore,
    /// An in-place change, maybe one of a burst: reload once the file has been quiet.
    Debounce,
    /// A complete new file (a rename onto the keys file, as the CLI and the admin API write
    /// it, or Kubernetes' swap of `..data`), or events were lost: reload at once.
    Now,
}

fn reaction(keys_file_name: &OsStr, event: &notify::Event) -> Reaction {
    use notify::event::{EventKind, ModifyKind, RenameMode};

    if event.need_rescan() {
        return Reaction::Now;
    }
    let ours = |p: &PathBuf| {
        p.file_name()
            .is_some_and(|n| n == keys_file_name || n == K8S_DATA)
    };
    match event.kind {
        // Reads, keygate's own included.
        EventKind::Access(_) => Reaction::Ignore,
        // notify pairs a rename's two halves into one more event, after reporting each half:
        // the halves are enough, and a second reload of the same rename would be wasted.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => Reaction::Ignore,
        _ if !event.paths.iter().any(ours) => Reaction::Ignore,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Reaction::Now,
        _ => Reaction::Debounce,
    }
}

/// Filesystem events that need a reload, counted, so that a reload can tell which of them it
/// covers: every event counted before it reads the file is about a change that read sees.
#[derive(Default)]
struct Pending {
    /// Events that need a reload, since the start.
    events: AtomicU64,
    /// The number of the latest event that needs its reload at once.
    urgent: AtomicU64,
    /// Woken at every event (one stored permit when nobody waits).
    notify: tokio::sync::Notify,
}

impl Pending {
    fn note(&self, reaction: Reaction) {
        if reaction == Reaction::Ignore {
            return;
        }
        let n = self.events.fetch_add(1, Ordering::SeqCst) + 1;
        if reaction == Reaction::Now {
            self.urgent.fetch_max(n, Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    /// The number of events so far.
    fn count(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Resolves once there has been an event after the first `seen`.
    async fn after(&self, seen: u64) {
        // A permit stored by an event already seen only costs one more look.
        while self.count() <= seen {
            self.notify.notified().await;
        }
    }

    /// After an event beyond the first `covered`: waits until the reload should run, at once
    /// for a [`Reaction::Now`], else once no event came for [`QUIET`], and never longer than
    /// [`MAX_DEBOUNCE`].
    async fn settle(&self, covered: u64) {
        let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
        loop {
            let seen = self.count();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.urgent.load(Ordering::SeqCst) > covered
                || left.is_zero()
                || tokio::time::timeout(QUIET.min(left), self.after(seen))
                    .await
                    .is_err()
            {
                return;
            }
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes a temporary file beside `path`, fsyncs it, renames it over `path`, fsyncs the
/// directory: readers see the old or the new content, never a mixture.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = with_suffix(path, &format!(".tmp.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// The digests whose record differs between two sets (added, removed or edited).
fn diff(old: &KeySet, new: &KeySet) -> Vec<KeyDigest> {
    let all: HashSet<&KeyDigest> = old.by_digest.keys().chain(new.by_digest.keys()).collect();
    all.into_iter()
        .filter(|d| old.by_digest.get(d) != new.by_digest.get(d))
        .copied()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The file format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    keys: Vec<FileKey>,
    #[serde(default)]
    service_accounts: Vec<FileAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccount {
    id: toml::Spanned<String>,
    name: String,
    tenant: String,
    role: String,
    created_at: Time,
    expires_at: Option<Time>,
    key_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    id: toml::Spanned<String>,
    sha256: toml::Spanned<HexDigest>,
    name: String,
    tenant: String,
    role: String,
    subject: String,
    kind: KeyKind,
    created_at: Time,
    expires_at: Option<Time>,
    revoked_at: Option<Time>,
}

struct HexDigest(KeyDigest);

impl<'de> Deserialize<'de> for HexDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyDigest::from_hex(&s)
            .map(HexDigest)
            .ok_or_else(|| serde::de::Error::custom("sha256 must be 64 hex digits"))
    }
}

struct Time(u64);

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| Time(d.as_secs()))
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not an RFC 3339 UTC time like 2030-01-01T00:00:00Z"
                ))
            })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses and validates a keys file. Errors name the line.
fn parse(text: &str) -> Result<KeySet, String> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
    let mut set = KeySet::default();
    let mut ids = HashSet::new();
    for k in doc.keys {
        // The line is counted only for an error: counting it for every key would cost a scan
        // of the file per key, a reload quadratic in the number of keys.
        let at = k.id.span().start;
        let id = k.id.into_inner();
        let digest = k.sha256.into_inner().0;
        let bad = |what: String| format!("line {}: key {id:?}: {what}", line_of(text, at));
        super::check_ident("id", &id).map_err(&bad)?;
        super::check_ident("tenant", &k.tenant).map_err(&bad)?;
        super::check_ident("role", &k.role).map_err(&bad)?;
        super::check_subject(&k.subject).map_err(&bad)?;
        super::check_name(&k.name).map_err(&bad)?;
        if !ids.insert(id.clone()) {
            return Err(bad("duplicate id".into()));
        }
        if set.by_digest.contains_key(&digest) {
            return Err(bad("duplicate sha256".into()));
        }
        set.order.push(digest);
        set.by_digest.insert(
            digest,
            KeyRecord {
                id,
                digest,
                name: k.name,
                tenant: k.tenant,
                role: k.role,
                subject: k.subject,
                kind: k.kind,
                created_at: k.created_at.0,
                expires_at: k.expires_at.map(|t| t.0),
                revoked_at: k.revoked_at.map(|t| t.0),
                last_used_at: None,
            },
        );
    }
    let mut names = HashSet::new();
    for a in doc.service_accounts {
        let at = a.id.span().start;
        let id = a.id.into_inner();
        let bad =
            |what: String| format!("line {}: service account {id:?}: {what}", line_of(text, at));
        super::check_ident("id", &id).map_err(&bad)?;
        super::check_ident("tenant", &a.tenant).map_err(&bad)?;
        super::check_ident("role", &a.role).map_err(&bad)?;
        super::check_name(&a.name).map_err(&bad)?;
        if set.account(&id).is_some() {
            return Err(bad("duplicate id".into()));
        }
        if !names.insert((a.tenant.clone(), ServiceAccount::name_key(&a.name))) {
            return Err(bad(format!(
                "tenant {} already has a service account named {:?}",
                a.tenant, a.name
            )));
        }
        if set.by_id(&a.key_id).is_none_or(|k| k.subject != id) {
            return Err(bad(format!(
                "key_id {:?} is not a key of this account",
                a.key_id
            )));
        }
        set.accounts.push(ServiceAccount {
            id,
            name: a.name,
            tenant: a.tenant,
            role: a.role,
            created_at: a.created_at.0,
            expires_at: a.expires_at.map(|t| t.0),
            key_id: a.key_id,
        });
    }
    Ok(set)
}

fn account_table(a: &ServiceAccount) -> toml_edit::Table {
    let mut t = toml_edit::Table::new();
    t["id"] = toml_edit::value(&a.id);
    t["name"] = toml_edit::value(&a.name);
    t["tenant"] = toml_edit::value(&a.tenant);
    t["role"] = toml_edit::value(&a.role);
    t["created_at"] = toml_edit::value(format_time(a.created_at));
    if let Some(e) = a.expires_at {
        t["expires_at"] = toml_edit::value(format_time(e));
    }
    t["key_id"] = toml_edit::value(&a.key_id);
    t
}

fn accounts_array(
    doc: &mut toml_edit::DocumentMut,
) -> Result<&mut toml_edit::ArrayOfTables, StoreError> {
    let item = doc
        .entry("service_accounts")
        .or_insert(toml_edit::Item::ArrayOfTables(
            toml_edit::ArrayOfTables::new(),
        ));
    item.as_array_of_tables_mut().ok_or_else(|| {
        StoreError::Corrupt(
            "`service_accounts` must be written as [[service_accounts]] tables".into(),
        )
    })
}

/// Sets `field` to a time on the `[[keys]]` table with this id.
fn set_key_time(
    doc: &mut toml_edit::DocumentMut,
    id: &str,
    field: &str,
    at: u64,
) -> Result<(), StoreError> {
    for t in keys_array(doc)?.iter_mut() {
        if t.get("id").and_then(|v| v.as_str()) == Some(id) {
            t[field] = toml_edit::value(format_time(at));
        }
    }
    Ok(())
}

/// Appends a key table, moving a keyless file's trailing comments in front of it.
fn push_key(doc: &mut toml_edit::DocumentMut, record: &KeyRecord) -> Result<(), StoreError> {
    let mut table = to_table(record);
    // In a file without keys yet, comments are the document's trailing text; move them in
    // front of the first table so they stay at the top.
    let trailing = doc.trailing().as_str().unwrap_or("").to_owned();
    if !trailing.trim().is_empty() && !doc.contains_key("keys") {
        table.decor_mut().set_prefix(trailing);
        doc.set_trailing("");
    }
    keys_array(doc)?.push(table);
    Ok(())
}

fn key_taken(current: &KeySet, record: &KeyRecord) -> Result<(), StoreError> {
    if current.by_id(&record.id).is_some() || current.by_digest.contains_key(&record.digest) {
        return Err(StoreError::Conflict(format!("key id {} exists", record.id)));
    }
    Ok(())
}

fn to_table(r: &KeyRecord) -> toml_edit::Table {
    let mut t = toml_edit::Table::new();
    t["id"] = toml_edit::value(&r.id);
    t["sha256"] = toml_edit::value(r.digest.to_hex());
    t["name"] = toml_edit::value(&r.name);
    t["tenant"] = toml_edit::value(&r.tenant);
    t["role"] = toml_edit::value(&r.role);
    t["subject"] = toml_edit::value(&r.subject);
    t["kind"] = toml_edit::value(r.kind.as_str());
    t["created_at"] = toml_edit::value(format_time(r.created_at));
    if let Some(e) = r.expires_at {
        t["expires_at"] = toml_edit::value(format_time(e));
    }
    if let Some(e) = r.revoked_at {
        t["revoked_at"] = toml_edit::value(format_time(e));
    }
    t
}

fn keys_array(
    doc: &mut toml_edit::DocumentMut,
) -> Result<&mut toml_edit::ArrayOfTables, StoreError> {
    let item = doc.entry("keys").or_insert(toml_edit::Item::ArrayOfTables(
        toml_edit::ArrayOfTables::new(),
    ));
    item.as_array_of_tables_mut()
        .ok_or_else(|| StoreError::Corrupt("`keys` must be written as [[keys]] tables".into()))
}

#[async_trait]
impl Store for FileStore {
    async fn lookup(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.snapshot().by_digest.get(digest).cloned())
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(move |doc, current| {
            key_taken(current, &record)?;
            push_key(doc, &record)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.snapshot().by_id(id).map(|r| self.with_last_used(r)))
    }

    async fn list(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let set = self.snapshot();
        Ok(set
            .order
            .iter()
            .filter_map(|d| set.by_digest.get(d))
            .filter(|r| tenant.is_none_or(|t| t == r.tenant))
            .map(|r| self.with_last_used(r))
            .collect())
    }

    async fn revoke(&self, id: &str, at: u64) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_owned();
        self.write(move |doc, current| {
            let Some(record) = current.by_id(&id) else {
                return Ok(None);
            };
            let mut record = record.clone();
            if record.revoked_at.is_none() {
                record.revoked_at = Some(at);
                set_key_time(doc, &id, "revoked_at", at)?;
            }
            Ok(Some(record))
        })
        .await
    }

    async fn create_account(
        &self,
        account: &ServiceAccount,
        key: &KeyRecord,
    ) -> Result<(), StoreError> {
        let (account, key) = (account.clone(), key.clone());
        self.write(move |doc, current| {
            let name = ServiceAccount::name_key(&account.name);
            if current
                .accounts
                .iter()
                .any(|a| a.tenant == account.tenant && ServiceAccount::name_key(&a.name) == name)
            {
                return Err(StoreError::Conflict(format!(
                    "tenant {} already has a service account named {:?}",
                    account.tenant, account.name
                )));
            }
            if current.account(&account.id).is_some() {
                return Err(StoreError::Conflict(format!(
                    "service account id {} exists",
                    account.id
                )));
            }
            key_taken(current, &key)?;
            push_key(doc, &key)?;
            accounts_array(doc)?.push(account_table(&account));
            Ok(())
        })
        .await
    }

    async fn get_account(&self, id: &str) -> Result<Option<ServiceAccount>, StoreError> {
        Ok(self.snapshot().account(id).cloned())
    }

    async fn list_accounts(&self, tenant: Option<&str>) -> Result<Vec<ServiceAccount>, StoreError> {
        let set = self.snapshot();
        Ok(set
            .accounts
            .iter()
            .filter(|a| tenant.is_none_or(|t| t == a.tenant))
            .cloned()
            .collect())
    }

    async fn rotate_account(
        &self,
        id: &str,
        new_key: &KeyRecord,
        old: OldKeys,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        let (id, new_key) = (id.to_owned(), new_key.clone());
        self.write(move |doc, current| {
            let Some(account) = current.account(&id) else {
                return Ok(None);
            };
            key_taken(current, &new_key)?;
            for k in current.account_keys(&id).filter(|k| k.revoked_at.is_none()) {
                match old {
                    OldKeys::RevokeAt(at) => set_key_time(doc, &k.id, "revoked_at", at)?,
                    OldKeys::ExpireAt(at) if k.expires_at.is_none_or(|e| e > at) => {
                        set_key_time(doc, &k.id, "expires_at", at)?
                    }
                    OldKeys::ExpireAt(_) => {}
                }
            }
            push_key(doc, &new_key)?;
            let mut account = account.clone();
            account.key_id = new_key.id.clone();
            account.expires_at = new_key.expires_at;
            for t in accounts_array(doc)?.iter_mut() {
                if t.get("id").and_then(|v| v.as_str()) == Some(id.as_str()) {
                    *t = account_table(&account);
                }
            }
            Ok(Some(account))
        })
        .await
    }

    async fn remove_account(
        &self,
        id: &str,
        at: u64,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        let id = id.to_owned();
        self.write(move |doc, current| {
            let Some(account) = current.account(&id) else {
                return Ok(None);
            };
            for k in current.account_keys(&id).filter(|k| k.revoked_at.is_none()) {
                set_key_time(doc, &k.id, "revoked_at", at)?;
            }
            let accounts = accounts_array(doc)?;
            let at_index = accounts
                .iter()
                .position(|t| t.get("id").and_then(|v| v.as_str()) == Some(id.as_str()));
            if let Some(i) = at_index {
                accounts.remove(i);
            }
            Ok(Some(account.clone()))
        })
        .await
    }

    async fn account_keys(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(self
            .snapshot()
            .account_keys(id)
            .map(|r| self.with_last_used(r))
            .collect())
    }

    async fn touch(&self, used: &[(KeyDigest, u64)]) -> Result<(), StoreError> {
        let set = self.snapshot();
        let read_only = self.read_only();
        let text = {
            let mut map = self.inner.last_used.lock().expect("last used lock");
            let mut changed = false;
            for (d, t) in used {
                if let Some(r) = set.by_digest.get(d) {
                    let slot = map.entry(r.id.clone()).or_insert(0);
                    if *slot < *t {
                        *slot = *t;
                        changed = true;
                    }
                }
            }
            // A read-only file keeps them here only: writing would fail every interval.
            if !changed || read_only {
                return Ok(());
            }
            serde_json::to_vec(&*map).map_err(|e| StoreError::Corrupt(e.to_string()))?
        };
        let path = last_used_path(&self.inner.path);
        self.blocking(move |inner| match write_atomically(&path, &text) {
            Ok(()) => Ok(()),
            Err(e) if is_read_only(&e) => {
                inner.note_writable(Some(format!("cannot write {}: {e}", path.display())));
                Ok(())
            }
            Err(e) => Err(StoreError::Unavailable(format!(
                "cannot write {}: {e}",
                path.display()
            ))),
        })
        .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let path = self.audit_path();
        let mut line = serde_json::to_vec(entry)
            .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
        line.push(b'\n');
        self.blocking(move |_| {
            // One write of a whole line with O_APPEND: concurrent writers never interleave.
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(&line))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot append to {}: {e}", path.display()))
                })
        })
        .await
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let path = self.audit_path();
        self.blocking(move |_| {
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )))
                }
            };
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(limit)..]
                .iter()
                .map(|l| {
                    serde_json::from_str(l)
                        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
                })
                .collect()
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(e) = &*self.inner.reload_error.lock().expect("error lock") {
            warnings.push(format!(
                "keys file reload failed, serving the last good keys: {e}"
            ));
        }
        if let Some(why) = &*self
            .inner
            .read_only
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            warnings.push(format!(
                "last-used times are not persisted: keys file {} is read-only ({why}); they are kept in this instance's memory only",
                self.inner.path.display()
            ));
        }
        warnings
    }

    fn read_only(&self) -> bool {
        self.inner
            .read_only
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn start(self: Arc<Self>, sink: Arc<dyn InvalidationSink>) -> Result<(), StoreError> {
        use notify::{RecursiveMode, Watcher};

        let _ = self.inner.sink.set(sink.clone());
        if let Some(why) = &*self
            .inner
            .read_only
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            warn_read_only(&self.inner.path, why);
        }

        let pending = Arc::new(Pending::default());
        let noted = pending.clone();
        let name = self
            .inner
            .path
            .file_name()
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "keys file {} has no file name",
                    self.inner.path.display()
                ))
            })?
            .to_owned();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // A watcher error may hide a change: reload to be sure.
            noted.note(ev.map_or(Reaction::Debounce, |ev| reaction(&name, &ev)));
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot watch the keys file: {e}")))?;
        // The directory, not the file: a rename onto the file or a Kubernetes symlink swap
        // replaces what a watch on the file itself would follow.
        let dir = dir_of(&self.inner.path).to_owned();
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| StoreError::Unavailable(format!("cannot watch {}: {e}", dir.display())))?;
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();

        tokio::spawn(async move {
            // Dropping the watcher would stop the events.
            let _watcher = watcher;
            // Events whose changes the last reload has read.
            let mut covered = 0;
            loop {
                let hup = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = pending.after(covered) => pending.settle(covered).await,
                    _ = hup => tracing::info!("SIGHUP: reloading the keys file"),
                }
                // Invariant (no change left unloaded): an event is counted after its change
                // happened, and the count is taken here, before the reload reads the file. So
                // the reload sees the change of every event up to `covered`, and any event
                // counted later, even one of a change it did see, gets a reload of its own.
                // Tested by the timing tests in tests/file_store.rs.
                covered = pending.count();
                let inner = self.inner.clone();
                match tokio::task::spawn_blocking(move || inner.reload()).await {
                    Ok(Ok(changed)) => {
                        if !changed.is_empty() {
                            tracing::info!(changed = changed.len(), "keys file reloaded");
                        }
                        for d in &changed {
                            sink.invalidate(d).await;
                        }
                    }
                    Ok(Err(e)) => tracing::error!(
                        error = %e,
                        "keys file reload failed; still serving the last good keys"
                    ),
                    Err(e) => tracing::error!(error = %e, "keys file reload task failed"),
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[keys]]
id = "key_a"
sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
name = "a"
tenant = "acme"
role = "admin"
subject = "alice"
kind = "user"
created_at = "2026-01-01T00:00:00Z"

[[keys]]
id = "key_b"
sha256 = "0000000000000000000000000000000000000000000000000000000000000002"
name = "b"
tenant = "acme"
role = "reader"
subject = "sa_bob"
kind = "service_account"
created_at = "2026-01-01T00:00:00Z"
expires_at = "2030-01-01T00:00:00Z"
"#;

    #[test]
    fn parses_records_in_order() {
        let set = parse(GOOD).unwrap();
        assert_eq!(set.order.len(), 2);
        let b = set.by_id("key_b").unwrap();
        assert_eq!(b.kind, KeyKind::ServiceAccount);
        assert_eq!(b.expires_at, Some(1_893_456_000));
        assert_eq!(parse("").unwrap(), KeySet::default());
    }

    #[test]
    fn errors_name_the_line() {
        let bad_hex = GOOD.replace(
            "0000000000000000000000000000000000000000000000000000000000000002",
            "xyz",
        );
        let e = parse(&bad_hex).unwrap_err();
        assert!(e.contains("line 14") && e.contains("sha256"), "{e}");

        let dup = GOOD.replace("key_b", "key_a");
        let e = parse(&dup).unwrap_err();
        assert!(e.contains("line 13") && e.contains("duplicate id"), "{e}");

        let bad_tenant = GOOD.replace(
            "tenant = \"acme\"\nrole = \"reader\"",
            "tenant = \"a b\"\nrole = \"reader\"",
        );
        let e = parse(&bad_tenant).unwrap_err();
        assert!(e.contains("line 13") && e.contains("tenant"), "{e}");

        let e = parse("[[keys]]\nid = \n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");

        let e = parse(&GOOD.replace(
            "subject = \"sa_bob\"",
            "subject = \"sa_bob\"\nsecret = \"x\"",
        ))
        .unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn service_account_names_are_unique_per_tenant_regardless_of_case() {
        let account = |name: &str, tenant: &str, id: &str| {
            format!(
                "\n[[service_accounts]]\nid = \"{id}\"\nname = \"{name}\"\ntenant = \"{tenant}\"\nrole = \"reader\"\ncreated_at = \"2026-01-01T00:00:00Z\"\nkey_id = \"key_b\"\n"
            )
        };
        let one = format!("{GOOD}{}", account("Bob", "acme", "sa_bob"));
        let set = parse(&one).unwrap();
        assert_eq!(set.account("sa_bob").unwrap().key_id, "key_b");
        let e = parse(&format!("{one}{}", account("BOB", "acme", "sa_2"))).unwrap_err();
        assert!(e.contains("already has a service account"), "{e}");
        // key_b belongs to sa_bob, not to this account.
        let e = parse(&format!("{GOOD}{}", account("x", "acme", "sa_x"))).unwrap_err();
        assert!(e.contains("key_id"), "{e}");
    }

    #[test]
    fn diff_reports_added_removed_and_edited_keys() {
        let old = parse(GOOD).unwrap();
        let edited = parse(&GOOD.replace("role = \"reader\"", "role = \"admin\"")).unwrap();
        let changed = diff(&old, &edited);
        assert_eq!(
            changed,
            vec![KeyDigest::from_hex(&format!("{:064}", 2)).unwrap()]
        );
        let empty = KeySet::default();
        assert_eq!(diff(&old, &empty).len(), 2);
        assert_eq!(diff(&empty, &old).len(), 2);
        assert!(diff(&old, &parse(GOOD).unwrap()).is_empty());
    }

    /// A keys file with `text` in a fresh directory.
    fn keys_file(text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("keygate-unit-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        fs::write(&path, text).unwrap();
        path
    }

    fn digest(n: u8) -> KeyDigest {
        KeyDigest::from_hex(&format!("{n:064}")).unwrap()
    }

    /// `GOOD` with key_a revoked, as another process would write it.
    fn revoke_a(text: &str) -> String {
        let created = "kind = \"user\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n";
        text.replacen(
            created,
            &format!("{created}revoked_at = \"2026-02-01T00:00:00Z\"\n"),
            1,
        )
    }

    #[test]
    fn an_edit_reports_what_another_writer_changed_since_the_last_reload() {
        let path = keys_file(GOOD);
        let store = FileStore::open(&path, false).unwrap();
        // Another process revokes key_a; this instance has not reloaded yet.
        fs::write(&path, revoke_a(GOOD)).unwrap();
        // This instance's own write adopts the file, key_a's revocation with it.
        let mut new = KeyRecord::example(digest(3));
        new.id = "key_c".into();
        let ((), changed) = store.inner.edit(move |doc, _| push_key(doc, &new)).unwrap();
        let mut changed = changed;
        changed.sort_by_key(|d| d.to_hex());
        assert_eq!(
            changed,
            vec![digest(1), digest(3)],
            "key_a's revocation was dropped"
        );
        assert!(store
            .snapshot()
            .by_id("key_a")
            .unwrap()
            .revoked_at
            .is_some());
        assert!(store.inner.reload().unwrap().is_empty());
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_reload_that_read_the_file_before_a_write_never_adopts_it_after_the_write() {
        #[derive(Debug, PartialEq)]
        enum Seen {
            At(Point),
            WriteDone,
        }
        let path = keys_file(GOOD);
        let store = FileStore::open(&path, false).unwrap();
        let (seen, events) = std::sync::mpsc::channel();
        let (go, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let to_test = seen.clone();
        let _ = store.inner.hook.set(Box::new(move |point| {
            let _ = to_test.send(Seen::At(point));
            if point == Point::ReloadRead {
                // Held here, after the read, until the test lets it go.
                let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
            }
        }));
        let wait = Duration::from_secs(10);

        let inner = store.inner.clone();
        let reload = std::thread::spawn(move || inner.reload().unwrap());
        assert_eq!(
            events.recv_timeout(wait).unwrap(),
            Seen::At(Point::ReloadRead)
        );

        // An API revoke of key_a while that reload holds the file as it was before.
        let inner = store.inner.clone();
        let write = std::thread::spawn(move || {
            let out = inner.edit(|doc, _| set_key_time(doc, "key_a", "revoked_at", 1_800_000_000));
            let _ = seen.send(Seen::WriteDone);
            out.unwrap().1
        });
        // Either the write waits for the reload (ordered), or it finished first.
        let next = events.recv_timeout(wait).unwrap();
        assert!(
            matches!(next, Seen::At(Point::ApplyContended) | Seen::WriteDone),
            "{next:?}"
        );
        go.send(()).unwrap();
        let mut reported = reload.join().unwrap();
        reported.extend(write.join().unwrap());

        let served = store.snapshot();
        assert_eq!(
            served.by_id("key_a").unwrap().revoked_at,
            Some(1_800_000_000),
            "a reload put back the set from before the revocation"
        );
        assert!(
            reported.contains(&digest(1)),
            "the revocation was never reported"
        );
        assert_eq!(*served, parse(&fs::read_to_string(&path).unwrap()).unwrap());
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn the_watcher_reacts_to_the_keys_file_only_and_at_once_to_a_rename_onto_it() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, Flag, ModifyKind, RenameMode,
        };
        let dir = Path::new("/etc/keygate");
        let event = |kind: EventKind, names: &[&str]| {
            names
                .iter()
                .fold(notify::Event::new(kind), |e, n| e.add_path(dir.join(n)))
        };
        let name = OsStr::new("keys.toml");
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let from = EventKind::Modify(ModifyKind::Name(RenameMode::From));

        // The CLI's and the API's atomic replace, and Kubernetes' symlink swap.
        for e in [
            event(to, &["keys.toml"]),
            event(to, &["..data"]),
            notify::Event::new(EventKind::Other).set_flag(Flag::Rescan),
        ] {
            assert_eq!(reaction(name, &e), Reaction::Now, "{e:?}");
        }
        // In-place writes, and the file moved away (an editor's backup).
        for e in [
            event(data, &["keys.toml"]),
            event(EventKind::Create(CreateKind::File), &["keys.toml"]),
            event(from, &["keys.toml"]),
            event(from, &["..data"]),
        ] {
            assert_eq!(reaction(name, &e), Reaction::Debounce, "{e:?}");
        }
        // Everything else in the directory, reads of the keys file, and the pairing of a
        // rename's halves (each half was reported already).
        for e in [
            event(both, &["keys.toml.tmp.42", "keys.toml"]),
            event(both, &["..data_tmp", "..data"]),
            event(both, &["keys.toml", "keys.toml~"]),
            event(data, &["keygate.log"]),
            event(both, &["keygate.log", "keygate.log.1"]),
            event(data, &["keys.toml.audit.jsonl"]),
            event(
                both,
                &["keys.toml.last-used.json.tmp.7", "keys.toml.last-used.json"],
            ),
            event(data, &["keys.toml.lock"]),
            event(EventKind::Create(CreateKind::File), &["keys.toml.tmp.42"]),
            event(data, &["keys.toml.bak"]),
            event(data, &["other-keys.toml"]),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["keys.toml"],
            ),
            event(EventKind::Access(AccessKind::Any), &["keys.toml"]),
        ] {
            assert_eq!(reaction(name, &e), Reaction::Ignore, "{e:?}");
        }
    }
}
