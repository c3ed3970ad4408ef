//! keygate's container image: the `Dockerfile` and `scripts/image.sh`, which assembles the same
//! image without Docker, from the binary cargo built for these tests. The archive is built once
//! and inspected: its OCI config (non-root user, entrypoint keygate, keygate's default ports,
//! labels) against keygate's own config defaults and against the Dockerfile's runtime stage,
//! line by line; then its root filesystem is unpacked and the image's binary runs under
//! `chroot` as the image's user, with nothing else from this machine: `--version`, a
//! `keys create` that writes only in the working directory, and `serve` answering a probe.
//!
//! Building the archive needs root and umoci (`scripts/test.sh` installs umoci). Without them
//! those tests are skipped with a message, except under `CI=true`, where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the image's binary lives; the entrypoint of both builds.
const ENTRYPOINT: &str = "/usr/local/bin/keygate";
/// distroless's `nonroot` user and group.
const NONROOT: &str = "65532:65532";
/// More than the image may hold beside keygate's binary (libraries, certificates, users):
/// glibc, libgcc and the loader take about 4 MiB.
const MAX_BESIDE_BINARY: u64 = 8 << 20;

/// What the Dockerfile's last stage (the runtime image) declares.
#[derive(Debug, Default)]
struct Declared {
    base: String,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    ports: BTreeSet<String>,
    env: BTreeMap<String, String>,
    workdir: String,
    labels: BTreeMap<String, String>,
}

/// Splits an instruction's arguments on blanks outside double quotes, unquoting them.
fn words(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => {
                cur.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    assert!(!quoted, "unbalanced quotes in {s:?}");
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn pairs(s: &str, what: &str) -> Vec<(String, String)> {
    words(s)
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => panic!("{what} {w:?} is not KEY=VALUE"),
        })
        .collect()
}

/// Reads the Dockerfile's instructions (continued lines joined, comments dropped) and keeps
/// those of its last stage.
fn dockerfile() -> Declared {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut d = Declared::default();
    for line in lines {
        let (op, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let args = args.trim();
        let exec_form = |what: &str| -> Vec<String> {
            serde_json::from_str(args)
                .unwrap_or_else(|e| panic!("{what} is not in exec form (a JSON array): {e}"))
        };
        match op.to_ascii_uppercase().as_str() {
            "FROM" => {
                d = Declared {
                    base: words(args)[0].clone(),
                    ..Declared::default()
                }
            }
            "USER" => d.user = args.to_owned(),
            "ENTRYPOINT" => d.entrypoint = exec_form("ENTRYPOINT"),
            "CMD" => d.cmd = exec_form("CMD"),
            "EXPOSE" => d.ports.extend(words(args).into_iter().map(|p| {
                if p.contains('/') {
                    p
                } else {
                    format!("{p}/tcp")
                }
            })),
            "ENV" => d.env.extend(pairs(args, "ENV")),
            "LABEL" => d.labels.extend(pairs(args, "LABEL")),
            "WORKDIR" => d.workdir = args.to_owned(),
            _ => {}
        }
    }
    d
}

/// The port of a listen address.
fn port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?} is not an address: {e}"))
        .port()
}

/// keygate's default proxy and admin ports, from its own config defaults.
fn default_ports() -> BTreeSet<String> {
    let server = keygate::config::Config::default().server;
    [&server.listen, &server.admin_listen]
        .into_iter()
        .map(|a| format!("{}/tcp", port(a)))
        .collect()
}

#[test]
fn the_dockerfile_runs_keygate_as_non_root_on_its_default_ports() {
    let d = dockerfile();
    assert_eq!(d.base, "gcr.io/distroless/cc-debian12:nonroot");
    assert_eq!(d.user, NONROOT);
    assert_eq!(d.entrypoint, [ENTRYPOINT]);
    assert_eq!(d.cmd, ["serve"]);
    assert_eq!(d.ports, default_ports());
    // The admin listener (probes, metrics) must be reachable from outside the container, on
    // the port the image exposes.
    let admin = &d.env["KEYGATE__SERVER__ADMIN_LISTEN"];
    let admin: SocketAddr = admin.parse().unwrap();
    assert!(admin.ip().is_unspecified(), "{admin}");
    let default_admin = keygate::config::Config::default().server.admin_listen;
    assert_eq!(admin.port(), port(&default_admin));
    assert!(d.workdir.starts_with('/'), "{:?}", d.workdir);
    let label = |k: &str| d.labels[&format!("org.opencontainers.image.{k}")].as_str();
    assert_eq!(label("title"), "keygate");
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(label("licenses"), env!("CARGO_PKG_LICENSE"));
    assert!(label("source").starts_with("https://"));
    assert!(!label("description").is_empty());
}

/// Why the image cannot be built here, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("they need root (to set the image's owners and to chroot)".into());
    }
    for tool in ["umoci", "chroot", "ldd", "tar"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (`apt-get install -y umoci`: scripts/test.sh does)"
            ));
        }
    }
    None
}

/// Skips (returns false) or, under `CI=true`, fails when the image cannot be built here.
fn can_build(test: &str) -> bool {
    let Some(why) = missing() else { return true };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}");
    }
    eprintln!("skipping {test}: {why}");
    false
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The archive `scripts/image.sh` built, opened.
struct Image {
    dir: PathBuf,
    /// The OCI layout, extracted from the archive.
    layout: PathBuf,
    archive_bytes: u64,
}

impl Image {
    /// The image built once for all the tests of this file.
    fn get() -> &'static Image {
        static IMAGE: OnceLock<Image> = OnceLock::new();
        IMAGE.get_or_init(Image::build)
    }

    fn build() -> Image {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image");
        let _ = std::fs::remove_dir_all(&dir);
        let layout = dir.join("oci");
        std::fs::create_dir_all(&layout).unwrap();
        let archive = dir.join("keygate-image.tar");
        run(Command::new(Path::new(ROOT).join("scripts/image.sh"))
            .arg(&archive)
            .env("KEYGATE_BIN", env!("CARGO_BIN_EXE_keygate")));
        run(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout));
        let archive_bytes = std::fs::metadata(&archive).unwrap().len();
        Image {
            dir,
            layout,
            archive_bytes,
        }
    }

    fn blob(&self, digest: &str) -> Value {
        let (alg, hex) = digest.split_once(':').unwrap();
        let path = self.layout.join("blobs").join(alg).join(hex);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The image's tag and its OCI config.
    fn config(&self) -> (String, Value) {
        let index = std::fs::read(self.layout.join("index.json")).unwrap();
        let index: Value = serde_json::from_slice(&index).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
        let tag = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap()
            .to_owned();
        let manifest = self.blob(manifests[0]["digest"].as_str().unwrap());
        (
            tag,
            self.blob(manifest["config"]["digest"].as_str().unwrap()),
        )
    }

    /// The image's root filesystem, unpacked.
    fn rootfs(&self) -> PathBuf {
        let bundle = self.dir.join("bundle");
        let _ = std::fs::remove_dir_all(&bundle);
        let (tag, _) = self.config();
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", self.layout.display()))
            .arg(&bundle));
        bundle.join("rootfs")
    }
}

fn strings(v: &Value) -> Vec<String> {
    let a = v
        .as_array()
        .unwrap_or_else(|| panic!("{v} is not an array"));
    a.iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

#[test]
fn the_image_archive_declares_what_the_dockerfile_declares() {
    if !can_build("the_image_archive_declares_what_the_dockerfile_declares") {
        return;
    }
    let image = Image::get();
    let (tag, config) = image.config();
    assert_eq!(tag, env!("CARGO_PKG_VERSION"));
    assert_eq!(config["os"], "linux");
    let c = &config["config"];
    let d = dockerfile();

    assert_eq!(c["User"], d.user);
    assert_ne!(c["User"].as_str().unwrap().split(':').next(), Some("0"));
    assert_eq!(strings(&c["Entrypoint"]), [ENTRYPOINT]);
    assert_eq!(strings(&c["Entrypoint"]), d.entrypoint);
    assert_eq!(strings(&c["Cmd"]), d.cmd);
    let ports: BTreeSet<String> = c["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(ports, default_ports());
    assert_eq!(ports, d.ports);
    assert_eq!(c["WorkingDir"], d.workdir);
    let env: BTreeMap<String, String> = strings(&c["Env"])
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    for (k, v) in &d.env {
        assert_eq!(
            env.get(k),
            Some(v),
            "{k} in the image's environment {env:?}"
        );
    }
    let labels: BTreeMap<String, String> =
        serde_json::from_value(c["Labels"].clone()).unwrap_or_default();
    assert_eq!(labels, d.labels);
    eprintln!(
        "image archive: {} bytes (keygate's test build)",
        image.archive_bytes
    );
}

/// Every file under `dir`, as paths from it, with their sizes.
fn files(dir: &Path, under: &Path, out: &mut BTreeMap<PathBuf, u64>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_dir() {
            files(&entry.path(), under, out);
        } else {
            let path = entry.path().strip_prefix(under).unwrap().to_owned();
            out.insert(path, meta.len());
        }
    }
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status line of `GET path` on a loopback port, or None while nothing answers there.
fn get(port: u16, path: &str) -> Option<String> {
    let timeout = Duration::from_secs(2);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = TcpStream::connect_timeout(&addr, timeout).ok()?;
    conn.set_read_timeout(Some(timeout)).unwrap();
    conn.set_write_timeout(Some(timeout)).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).ok()?;
    let mut head = Vec::new();
    let _ = conn.take(64 * 1024).read_to_end(&mut head);
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next()?.to_owned();
    (!line.is_empty()).then_some(line)
}

#[test]
fn the_images_binary_runs_as_its_non_root_user_with_nothing_but_the_image() {
    if !can_build("the_images_binary_runs_as_its_non_root_user_with_nothing_but_the_image") {
        return;
    }
    let image = Image::get();
    let rootfs = image.rootfs();
    let (_, config) = image.config();
    let user = config["config"]["User"].as_str().unwrap();
    // The image's environment only (its PATH also finds chroot here).
    let env: Vec<(String, String)> = strings(&config["config"]["Env"])
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();

    // The image's own binary, its own loader and libraries: nothing from this machine.
    let out = run(Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(&rootfs)
        .arg(ENTRYPOINT)
        .arg("--version")
        .env_clear()
        .envs(env.iter().cloned()));
    let version = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        version.trim(),
        format!("keygate {}", env!("CARGO_PKG_VERSION"))
    );

    let mut all = BTreeMap::new();
    files(&rootfs, &rootfs, &mut all);

    // The working directory is the image user's: the file store writes its keys file there,
    // and keygate writes nowhere else (a read-only root filesystem does not stop it).
    let workdir = config["config"]["WorkingDir"].as_str().unwrap();
    run(Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(&rootfs)
        .arg(ENTRYPOINT)
        .args([
            "--keys-file",
            &format!("{workdir}/keys.toml"),
            "keys",
            "create",
        ])
        .args(["--tenant", "acme", "--role", "member", "--name", "image"])
        .args(["--output", "json"])
        // It prints the new key: not into the test's output.
        .stdout(Stdio::null())
        .env_clear()
        .envs(env.iter().cloned()));
    let mut after = BTreeMap::new();
    files(&rootfs, &rootfs, &mut after);
    let written: Vec<_> = after.keys().filter(|p| !all.contains_key(*p)).collect();
    let workdir = Path::new(workdir.trim_start_matches('/'));
    assert!(
        written.contains(&&workdir.join("keys.toml")),
        "no keys file in the working directory: {written:?}"
    );
    assert!(
        written.iter().all(|p| p.starts_with(workdir)),
        "written outside the working directory: {written:?}"
    );

    // And it serves from the image: the probe answers, a request without a key is refused.
    let (proxy, admin) = (free_port(), free_port());
    let child = Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(&rootfs)
        .arg(ENTRYPOINT)
        .args([
            "serve",
            "--keys-file",
            &format!("{}/keys.toml", workdir.display()),
        ])
        .args(["--listen", &format!("127.0.0.1:{proxy}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        // No upstream is needed for these two answers: a closed port.
        .args(["--upstream", "http://127.0.0.1:9"])
        .env_clear()
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthz = loop {
        match get(admin, "/healthz") {
            Some(head) => break head,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("the image's keygate serve did not answer /healthz within 20 s"),
        }
    };
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let refused = get(proxy, "/anything").expect("the proxy listener answers");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    for shell in ["sh", "bash", "dash", "busybox"] {
        let found: Vec<_> = all.keys().filter(|p| p.ends_with(shell)).collect();
        assert!(found.is_empty(), "the image holds a shell: {found:?}");
    }
    let binary = all[Path::new(ENTRYPOINT.trim_start_matches('/'))];
    let beside: u64 = all.values().sum::<u64>() - binary;
    assert!(
        beside < MAX_BESIDE_BINARY,
        "the image holds {beside} bytes beside keygate's binary: {all:#?}"
    );
    eprintln!(
        "image: {binary} bytes of keygate, {beside} bytes beside it, {} files",
        all.len()
    );
}
