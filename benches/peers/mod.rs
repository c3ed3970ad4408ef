//! The proxies the load harness measures keygate against: nginx (a plain `proxy_pass`, and a
//! static map of keys), haproxy, Traefik and Caddy, and the two gateways that ask keygate's
//! decision endpoint about every request (nginx `auth_request`, Traefik ForwardAuth), run
//! from the files in `deploy/authz/` with their example addresses replaced. Each is a reverse
//! proxy to the same upstream over HTTP/1.1 keep-alive, with as many workers as the machine
//! has cores, and no access log unless the row is an access-log row. Their configurations are
//! written into the harness's temporary directory and their own diagnostics go to files
//! beside them.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::free_port;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether `bin` is on the `PATH`; if not, prints the one line that says how to install it.
pub fn installed(what: &str, bin: &str, install: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("skipping {what}: `{bin}` is not installed; install it with: {install}");
    }
    found
}

/// The first version number (`2.6.12`) in what `bin args` prints, if any.
pub fn version(bin: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|t| t.contains('.') && t.starts_with(|c: char| c.is_ascii_digit()))
        .map(|t| t.trim_end_matches('.').to_owned())
}

/// A file for a child's diagnostics (its standard error).
fn log_file(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A started peer: its process, the address it proxies on, and where its diagnostics go.
pub struct Peer {
    pub child: Child,
    pub addr: SocketAddr,
    pub diagnostics: PathBuf,
}

/// nginx's listeners, all served by one master and its workers.
pub struct Nginx {
    pub child: Child,
    pub diagnostics: PathBuf,
    /// `proxy_pass`, no access log.
    pub plain: SocketAddr,
    /// `proxy_pass` with nginx's default access log (combined format, unbuffered).
    pub logged: SocketAddr,
    pub access_log: PathBuf,
    /// The static key map in front of the same `proxy_pass`, no access log.
    pub map: SocketAddr,
    /// The static key map with the default access log.
    pub map_logged: SocketAddr,
    pub map_access_log: PathBuf,
    /// `proxy_pass` over TLS (TLS 1.2 and 1.3, as keygate), no access log.
    pub tls: SocketAddr,
}

/// nginx as a reverse proxy, `worker_processes` = `workers`: the plain `proxy_pass` (with and
/// without its default access log), the same behind a static map of `keys` (`Bearer <key>` →
/// allowed, anything else 401, with and without the access log), and the plain one over TLS
/// with `cert` and `key`.
pub fn nginx(
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    cert: &Path,
    cert_key: &Path,
    keys: &[String],
) -> Nginx {
    let [plain, logged, map, map_logged, tls] = [(); 5].map(|()| loopback(free_port()));
    let access_log = dir.join("nginx-access.log");
    let map_access_log = dir.join("nginx-map-access.log");
    let map_file = dir.join("keys.map");
    let mut entries = String::with_capacity(keys.len() * 64);
    for k in keys {
        entries.push_str(&format!("  \"Bearer {k}\" 1;\n"));
    }
    write(&map_file, &entries);
    let pass = "proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";";
    let checked = format!("if ($key_ok = 0) {{ return 401; }}\n      {pass}");
    // The hash must hold every key: its size at least the number of keys, its buckets at
    // least one key's length.
    let hash_size = (keys.len() * 2).next_power_of_two().max(1024);
    let conf = format!(
        "worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  map_hash_max_size {hash_size};
  map_hash_bucket_size 128;
  map $http_authorization $key_ok {{
    default 0;
    include {map_file};
  }}
  upstream app {{ server {upstream}; keepalive 256; }}
  server {{
    listen {plain} reuseport;
    location / {{ {pass} }}
  }}
  server {{
    listen {logged} reuseport;
    access_log {access_log};
    location / {{ {pass} }}
  }}
  server {{
    listen {map} reuseport;
    location / {{ {checked} }}
  }}
  server {{
    listen {map_logged} reuseport;
    access_log {map_access_log};
    location / {{ {checked} }}
  }}
  server {{
    listen {tls} ssl reuseport;
    ssl_certificate {cert};
    ssl_certificate_key {cert_key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ {pass} }}
  }}
}}
",
        dir = dir.display(),
        map_file = map_file.display(),
        access_log = access_log.display(),
        map_access_log = map_access_log.display(),
        cert = cert.display(),
        cert_key = cert_key.display(),
    );
    let path = dir.join("nginx.conf");
    write(&path, &conf);
    let diagnostics = dir.join("nginx.stderr");
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(log_file(&diagnostics))
        .spawn()
        .expect("nginx");
    Nginx {
        child,
        diagnostics,
        plain,
        logged,
        access_log,
        map,
        map_logged,
        map_access_log,
        tls,
    }
}

/// haproxy in HTTP mode, `nbthread` = `workers`, keep-alive on both sides, and server
/// connections shared between client connections as nginx's `keepalive` pool does
/// (`http-reuse always`). No `log` line: haproxy logs nothing.
pub fn haproxy(dir: &Path, upstream: SocketAddr, workers: usize) -> Peer {
    let addr = loopback(free_port());
    let conf = format!(
        "global
  nbthread {workers}
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend proxy
  bind {addr}
  default_backend app
backend app
  server app {upstream}
"
    );
    let path = dir.join("haproxy.cfg");
    write(&path, &conf);
    let diagnostics = dir.join("haproxy.stderr");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log_file(&diagnostics))
        .spawn()
        .expect("haproxy");
    Peer {
        child,
        addr,
        diagnostics,
    }
}

/// Traefik with one entry point, the file provider (one router for every path, one service),
/// no API or dashboard, no access log, `GOMAXPROCS` = `workers`, and an idle pool of 256
/// upstream connections (as nginx's `keepalive 256`).
pub fn traefik(dir: &Path, upstream: SocketAddr, workers: usize) -> Peer {
    let addr = loopback(free_port());
    let routes = dir.join("traefik-routes.yml");
    write(
        &routes,
        &format!(
            "http:
  routers:
    app:
      rule: \"PathPrefix(`/`)\"
      entryPoints: [web]
      service: app
  services:
    app:
      loadBalancer:
        servers:
          - url: \"http://{upstream}\"
"
        ),
    );
    let path = dir.join("traefik.yml");
    write(
        &path,
        &format!(
            "global:
  checkNewVersion: false
  sendAnonymousUsage: false
entryPoints:
  web:
    address: \"{addr}\"
    transport:
      lifeCycle:
        graceTimeOut: 1s
serversTransport:
  maxIdleConnsPerHost: 256
providers:
  file:
    filename: \"{routes}\"
    watch: false
log:
  level: ERROR
",
            routes = routes.display()
        ),
    );
    run_traefik(dir, Path::new("traefik.yml"), addr, workers)
}

/// Caddy with one site and `reverse_proxy` to the upstream, no admin endpoint, no automatic
/// HTTPS, no access log (Caddy logs requests only when a site asks), `GOMAXPROCS` = `workers`,
/// and an idle pool of 256 upstream connections (as nginx's `keepalive 256`).
pub fn caddy(dir: &Path, upstream: SocketAddr, workers: usize) -> Peer {
    let addr = loopback(free_port());
    let path = dir.join("Caddyfile");
    write(
        &path,
        &format!(
            "{{
	admin off
	auto_https off
}}
:{port} {{
	bind 127.0.0.1
	reverse_proxy {upstream} {{
		transport http {{
			keepalive_idle_conns 512
			keepalive_idle_conns_per_host 256
		}}
	}}
}}
",
            port = addr.port()
        ),
    );
    let home = dir.join("caddy-home");
    std::fs::create_dir_all(&home).expect("caddy's home");
    let diagnostics = dir.join("caddy.stderr");
    let child = Command::new("caddy")
        .arg("run")
        .arg("--config")
        .arg(&path)
        .args(["--adapter", "caddyfile"])
        .env("GOMAXPROCS", workers.to_string())
        .env("HOME", &home)
        .env("XDG_DATA_HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .stdout(Stdio::null())
        .stderr(log_file(&diagnostics))
        .spawn()
        .expect("caddy");
    Peer {
        child,
        addr,
        diagnostics,
    }
}

/// The example addresses the files in `deploy/authz/` are written with (gateway, keygate's
/// decision endpoint, your service), replaced here by the harness's, as
/// `tests/authz_gateways.rs` does.
const EXAMPLE_GATEWAY: &str = "127.0.0.1:8000";
const EXAMPLE_KEYGATE: &str = "127.0.0.1:9191";
const EXAMPLE_UPSTREAM: &str = "127.0.0.1:3000";

/// A file of `deploy/authz/`.
fn deploy(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/authz")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with `from` replaced by `to` everywhere; `text` must contain `from` (a file that
/// lost it would otherwise run with an example address or setting left in).
fn replace(text: &str, name: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "deploy/authz/{name} has no {from:?}");
    text.replace(from, to)
}

/// A directory of its own for a peer whose file names would clash with another's.
fn subdir(dir: &Path, name: &str) -> PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("create {}: {e}", sub.display()));
    sub
}

/// nginx running `deploy/authz/nginx.conf` (`auth_request` to keygate's decision endpoint on
/// `authz`, keygate's refusals passed on whole), `worker_processes` = `workers`. The file's
/// example addresses are replaced by the harness's, and, as in every other nginx row: the
/// listener has `reuseport`, `worker_connections 4096`, no access log, and the example
/// service's `proxy_pass` goes to the same upstream pool (`keepalive 256`, HTTP/1.1), so the
/// row differs from nginx `proxy_pass` by the `auth_request` only. The file's own pool to
/// keygate (`keepalive 16`) is kept as users copy it: with 64 client connections on 2 workers
/// more checks are in flight than it keeps idle, and `ss` counted one new connection to
/// keygate per ~10 checks (TIME_WAIT sockets on keygate's port during a run).
pub fn nginx_auth_request(
    dir: &Path,
    upstream: SocketAddr,
    authz: SocketAddr,
    workers: usize,
) -> Peer {
    let name = "nginx.conf";
    let dir = subdir(dir, "authz-nginx");
    let addr = loopback(free_port());
    let conf = deploy(name);
    let conf = replace(
        &conf,
        name,
        &format!("proxy_pass http://{EXAMPLE_UPSTREAM};"),
        "proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";",
    );
    let conf = replace(
        &conf,
        name,
        &format!("listen {EXAMPLE_GATEWAY};"),
        &format!("listen {addr} reuseport;"),
    );
    let conf = replace(&conf, name, EXAMPLE_KEYGATE, &authz.to_string());
    let conf = replace(
        &conf,
        name,
        "\nevents {}\n",
        "\nevents { worker_connections 4096; }\n",
    );
    // What nginx writes goes to this directory (the packaged defaults are under /var).
    let d = dir.display();
    let conf = replace(
        &conf,
        name,
        "\nhttp {\n",
        &format!(
            "\nhttp {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream app {{ server {upstream}; keepalive 256; }}
"
        ),
    );
    let path = dir.join(name);
    write(&path, &conf);
    let diagnostics = dir.join("error.log");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&diagnostics)
        .unwrap_or_else(|e| panic!("create {}: {e}", diagnostics.display()));
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(&diagnostics)
        .arg("-c")
        .arg(&path)
        .arg("-g")
        .arg(format!(
            "daemon off; pid {d}/nginx.pid; worker_processes {workers};"
        ))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("nginx");
    Peer {
        child,
        addr,
        diagnostics,
    }
}

/// Traefik running `deploy/authz/traefik.yml` and `traefik-dynamic.yml` (ForwardAuth to
/// keygate's decision endpoint on `authz`, then the service), `GOMAXPROCS` = `workers`. The
/// files' example addresses are replaced by the harness's, and, as in the Traefik row, the
/// static configuration gains an idle pool of 256 upstream connections and `log.level: ERROR`,
/// so the row differs from Traefik alone by the ForwardAuth (and the header middleware that
/// removes `Authorization`) only. ForwardAuth's configuration has no pool setting for its
/// client to keygate (Go's default transport keeps 2 idle per host): `ss` counted one new
/// connection to keygate per ~2.4 checks at 64 client connections.
pub fn traefik_forward_auth(
    dir: &Path,
    upstream: SocketAddr,
    authz: SocketAddr,
    workers: usize,
) -> Peer {
    let dir = subdir(dir, "authz-traefik");
    let addr = loopback(free_port());
    let fixed = deploy("traefik.yml");
    for key in ["\nserversTransport:", "\nlog:"] {
        assert!(
            !fixed.contains(key),
            "deploy/authz/traefik.yml sets {key:?}"
        );
    }
    let fixed = replace(&fixed, "traefik.yml", EXAMPLE_GATEWAY, &addr.to_string())
        + "\nserversTransport:\n  maxIdleConnsPerHost: 256\nlog:\n  level: ERROR\n";
    let dynamic = deploy("traefik-dynamic.yml");
    let dynamic = replace(
        &dynamic,
        "traefik-dynamic.yml",
        EXAMPLE_KEYGATE,
        &authz.to_string(),
    );
    let dynamic = replace(
        &dynamic,
        "traefik-dynamic.yml",
        EXAMPLE_UPSTREAM,
        &upstream.to_string(),
    );
    write(&dir.join("traefik.yml"), &fixed);
    write(&dir.join("traefik-dynamic.yml"), &dynamic);
    // The static file names the dynamic one relative to the working directory.
    run_traefik(&dir, Path::new("traefik.yml"), addr, workers)
}

/// Traefik on the static configuration `config`, a file in `dir` (its working directory, so
/// the file may name others there), `GOMAXPROCS` = `workers`, its output in `dir`.
fn run_traefik(dir: &Path, config: &Path, addr: SocketAddr, workers: usize) -> Peer {
    let diagnostics = dir.join("traefik.stderr");
    let child = Command::new("traefik")
        .current_dir(dir)
        .arg(format!("--configFile={}", config.display()))
        .env("GOMAXPROCS", workers.to_string())
        .stdout(log_file(&dir.join("traefik.stdout")))
        .stderr(log_file(&diagnostics))
        .spawn()
        .expect("traefik");
    Peer {
        child,
        addr,
        diagnostics,
    }
}
