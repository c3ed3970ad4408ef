//! TLS termination on keygate's listeners: versions, ALPN, SNI, reloads, client certificates,
//! the first-head deadline over TLS, and the admin listener. Certificates come from a private
//! CA made with rcgen at test time; a real Redis, a real upstream, keygate in-process on port 0
//! (or the real binary, for the flags and SIGHUP), and a real rustls client (or `openssl
//! s_client`, to offer TLS 1.1, which rustls cannot).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::tls_server::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Slack on every bound: the time a loaded machine may add before keygate acts on a deadline.
const SLACK: Duration = Duration::from_secs(3);

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS12_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];

struct Rig {
    _redis: RedisServer,
    upstream: Upstream,
    keygate: Keygate,
    pki: Pki,
    /// The proxy listener's default certificate (for `localhost` and 127.0.0.1).
    cert: Issued,
    auth: String,
}

impl Rig {
    fn client(&self) -> ClientTls {
        ClientTls::trusting(&self.pki.ca_pem)
    }

    async fn scrape(&self) -> Scrape {
        within(Duration::from_secs(5), "/metrics", self.keygate.scrape()).await
    }

    async fn readyz(&self) -> serde_json::Value {
        let url = self.keygate.admin_url("/readyz");
        within(
            Duration::from_secs(5),
            "/readyz",
            Http::new().get(&url, &[]),
        )
        .await
        .json()
    }
}

/// keygate with TLS on the proxy listener (`server.tls_cert`/`tls_key` for `localhost`),
/// after `tweak`.
async fn rig(tag: &str, tweak: impl FnOnce(&mut keygate::config::Config, &Pki)) -> Rig {
    let pki = Pki::new(tag);
    let cert = pki.server("server", &["localhost", "127.0.0.1"]);
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace(tag);
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.server.tls_cert = Some(cert.cert.display().to_string());
    config.server.tls_key = Some(cert.key.display().to_string());
    tweak(&mut config, &pki);
    let admin_tls = config.server.admin_tls_cert.is_some();
    let keygate = Keygate::start(config).await;
    if admin_tls {
        let (tls, admin) = (ClientTls::trusting(&pki.ca_pem), keygate.admin);
        eventually(Duration::from_secs(10), "keygate is ready over TLS", || {
            let tls = &tls;
            async move {
                tls_get(tls, admin, "/readyz", &[])
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        })
        .await;
    } else {
        keygate.wait_ready().await;
    }
    let key = create_key(&*store, "acme", "admin").await;
    Rig {
        _redis: redis,
        upstream,
        keygate,
        pki,
        cert,
        auth: format!("Bearer {}", key.secret.expose()),
    }
}

#[tokio::test]
async fn tls_1_3_and_1_2_handshakes_succeed_and_the_upstream_sees_https() {
    let r = rig("tls-versions", |_, _| {}).await;
    for (versions, want) in [
        (&TLS13_ONLY, rustls::ProtocolVersion::TLSv1_3),
        (&TLS12_ONLY, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let tls = r.client().versions(versions);
        let mut conn = TlsConn::open(&tls, r.keygate.proxy, Some("localhost"))
            .await
            .unwrap_or_else(|e| panic!("{want:?} handshake: {e}"));
        assert_eq!(conn.version, want);
        let reply = conn.get("/", &[("authorization", &r.auth)]).await.unwrap();
        assert_eq!(reply.status, 200, "{want:?}: {:?}", reply.body);
    }
    let seen = r.upstream.requests();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.headers["x-forwarded-proto"], "https");
    }
    // A cleartext request on the TLS listener gets no HTTP answer.
    let out = raw_exchange(
        r.keygate.proxy,
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await;
    assert!(!out.contains("HTTP/1.1"), "{out}");
}

#[tokio::test]
async fn tls_1_1_is_refused_and_counted_as_a_protocol_version_failure() {
    let r = rig("tls-old", |_, _| {}).await;
    // rustls cannot offer TLS 1.1, so openssl does (its security level lowered to allow it).
    for flag in ["-tls1_1", "-tls1"] {
        let out = output_within(
            std::process::Command::new("openssl")
                .args(["s_client", "-connect", &r.keygate.proxy.to_string(), flag])
                .args(["-cipher", "DEFAULT@SECLEVEL=0", "-servername", "localhost"])
                .stdin(std::process::Stdio::null()),
            Duration::from_secs(10),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} accepted: {text}");
        assert!(!text.contains("BEGIN CERTIFICATE"), "{flag}: {text}");
        // No session: rustls answers a ClientHello without TLS 1.2 or 1.3 with an alert.
        assert!(text.contains("Cipher    : 0000"), "{flag}: {text}");
        assert!(text.contains("alert"), "{flag}: {text}");
    }
    let m = r.scrape().await;
    assert_eq!(
        m.get(
            "keygate_tls_handshake_failures_total{listener=\"proxy\",reason=\"protocol_version\"}"
        ),
        2.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn alpn_picks_h2_and_a_request_over_h2_and_tls_is_served() {
    let r = rig("tls-alpn", |_, _| {}).await;
    let tls = r.client().alpn(&[b"h2", b"http/1.1"]);
    let mut conn = TlsConn::open(&tls, r.keygate.proxy, Some("localhost"))
        .await
        .unwrap();
    assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
    for _ in 0..3 {
        let reply = conn.get("/", &[("authorization", &r.auth)]).await.unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.version, http::Version::HTTP_2);
    }
    let reply = conn.get("/", &[]).await.unwrap();
    assert_eq!(reply.status, 401);
    // A client offering only HTTP/1.1 gets it.
    let mut conn = TlsConn::open(&r.client(), r.keygate.proxy, Some("localhost"))
        .await
        .unwrap();
    assert_eq!(conn.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let reply = conn.get("/", &[("authorization", &r.auth)]).await.unwrap();
    assert_eq!(reply.version, http::Version::HTTP_11);
    assert_eq!(reply.status, 200);
    let seen = r.upstream.requests();
    assert!(seen
        .iter()
        .all(|s| s.headers["x-forwarded-proto"] == "https"));
}

#[tokio::test]
async fn sni_picks_the_certificate_for_the_name_and_the_default_otherwise() {
    let mut named = Vec::new();
    let r = rig("tls-sni", |c, pki| {
        let api = pki.server("api", &["api.example.test"]);
        let wild = pki.server("wild", &["*.apps.example.test"]);
        // Chosen by its `hosts`, not by the names it lists.
        let listed = pki.server("listed", &["listed.example.test"]);
        for (issued, hosts) in [
            (&api, vec![]),
            (&wild, vec![]),
            (&listed, vec!["other.example.test".to_owned()]),
        ] {
            c.server
                .tls_certificates
                .push(keygate::config::TlsCertificateConfig {
                    cert: issued.cert.display().to_string(),
                    key: issued.key.display().to_string(),
                    hosts,
                });
        }
        named = vec![api, wild, listed];
    })
    .await;
    let tls = ClientTls::trusting_anything();
    let leaf = |sni| sni_leaf(&tls, r.keygate.proxy, sni);
    assert_eq!(leaf(Some("api.example.test")).await, named[0].der);
    assert_eq!(leaf(Some("API.Example.Test")).await, named[0].der);
    assert_eq!(leaf(Some("x.apps.example.test")).await, named[1].der);
    assert_eq!(leaf(Some("other.example.test")).await, named[2].der);
    for sni in [
        Some("listed.example.test"),
        Some("a.b.apps.example.test"),
        Some("unknown.test"),
        None,
    ] {
        assert_eq!(leaf(sni).await, r.cert.der, "{sni:?} gets the default");
    }
    // A verifying client trusts what SNI chose.
    let reply = TlsConn::open(&r.client(), r.keygate.proxy, Some("api.example.test"))
        .await
        .unwrap()
        .get("/", &[("authorization", &r.auth)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let m = r.scrape().await;
    for (name, issued) in [
        ("localhost", &r.cert),
        ("api.example.test", &named[0]),
        ("*.apps.example.test", &named[1]),
        ("other.example.test", &named[2]),
    ] {
        let series =
            format!("keygate_tls_certificate_expiry_seconds{{listener=\"proxy\",name=\"{name}\"}}");
        assert_eq!(m.get(&series), issued.not_after as f64, "{}", m.text);
    }
}

async fn sni_leaf(
    tls: &ClientTls,
    addr: SocketAddr,
    sni: Option<&str>,
) -> rustls::pki_types::CertificateDer<'static> {
    let stream = tls
        .connect(addr, sni)
        .await
        .unwrap_or_else(|e| panic!("{sni:?}: {e}"));
    served_leaf(&stream)
}

/// Lays out `cert` like a mounted Kubernetes Secret: `tls.crt` and `tls.key` are symlinks
/// through `..data`, a symlink to a timestamped directory, swapped to update.
fn k8s_secret(dir: &Path, version: &str, cert: &Issued) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(&cert.cert, data.join("tls.crt")).unwrap();
    std::fs::copy(&cert.key, data.join("tls.key")).unwrap();
    let link = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &link).unwrap();
    std::fs::rename(&link, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        let _ = std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f));
    }
}

#[tokio::test]
async fn a_secret_swap_switches_the_certificate_for_new_connections_and_keeps_open_ones() {
    let pki = Pki::new("tls-reload");
    let secret = pki.dir.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    let first = pki.server("first", &["localhost"]);
    k8s_secret(&secret, "v1", &first);
    let r = rig("tls-reload", |c, _| {
        c.server.tls_cert = Some(secret.join("tls.crt").display().to_string());
        c.server.tls_key = Some(secret.join("tls.key").display().to_string());
        c.server.idle_timeout = "60s".into();
    })
    .await;
    // The rig's CA differs from this one: trust both by trusting anything, and compare leaves.
    let tls = ClientTls::trusting_anything();
    let mut open = TlsConn::open(&tls, r.keygate.proxy, Some("localhost"))
        .await
        .unwrap();
    assert_eq!(open.leaf, first.der);
    let reply = open.get("/", &[("authorization", &r.auth)]).await.unwrap();
    assert_eq!(reply.status, 200);

    let second = pki.server("second", &["localhost"]);
    k8s_secret(&secret, "v2", &second);
    let addr = r.keygate.proxy;
    eventually(
        Duration::from_secs(10),
        "new connections get the new certificate",
        || {
            let tls = &tls;
            let want = second.der.clone();
            async move { served_leaf(&tls.connect(addr, Some("localhost")).await.unwrap()) == want }
        },
    )
    .await;
    // The connection accepted before the swap is still served.
    for _ in 0..2 {
        let reply = open.get("/", &[("authorization", &r.auth)]).await.unwrap();
        assert_eq!(reply.status, 200);
    }
    let m = r.scrape().await;
    assert!(
        m.get("keygate_tls_certificate_reloads_total{listener=\"proxy\",result=\"ok\"}") >= 1.0,
        "{}",
        m.text
    );
    assert!(r.readyz().await["warnings"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_broken_new_certificate_keeps_the_old_one_and_shows_in_readyz_until_fixed() {
    let r = rig("tls-broken", |_, _| {}).await;
    let good = std::fs::read(&r.cert.cert).unwrap();
    let good_key = std::fs::read(&r.cert.key).unwrap();
    let secret = key_material(&r.cert);

    // A key that belongs to another certificate: the pair no longer matches.
    let other = r.pki.server("other", &["localhost"]);
    replace_file(&r.cert.key, &std::fs::read(&other.key).unwrap());
    let warning = |v: serde_json::Value| -> Option<String> {
        v["warnings"]
            .as_array()?
            .iter()
            .filter_map(|w| w.as_str())
            .find(|w| w.contains("tls"))
            .map(str::to_owned)
    };
    let mut shown = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while shown.is_none() {
        assert!(Instant::now() < deadline, "no TLS warning in /readyz");
        shown = warning(r.readyz().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shown = shown.unwrap();
    assert!(
        shown.contains("does not belong to the certificate"),
        "{shown}"
    );
    assert!(shown.contains("server.tls_cert"), "{shown}");
    assert!(
        !shown.contains(&secret),
        "the warning quotes the key: {shown}"
    );
    // Still serving the old certificate, to clients that trust it.
    let conn = TlsConn::open(&r.client(), r.keygate.proxy, Some("localhost"))
        .await
        .unwrap();
    assert_eq!(conn.leaf, r.cert.der);

    // Not PEM at all.
    replace_file(&r.cert.cert, b"not a certificate\n");
    let addr = r.keygate.admin;
    eventually(
        Duration::from_secs(10),
        "the warning names the file",
        || {
            let path = r.cert.cert.display().to_string();
            async move {
                let url = format!("http://{addr}/readyz");
                let v = Http::new().get(&url, &[]).await.json();
                warning(v).is_some_and(|w| w.contains(&path) && w.contains("no certificate"))
            }
        },
    )
    .await;
    let mut conn = TlsConn::open(&r.client(), r.keygate.proxy, Some("localhost"))
        .await
        .unwrap();
    assert_eq!(conn.leaf, r.cert.der);
    let reply = conn.get("/", &[("authorization", &r.auth)]).await.unwrap();
    assert_eq!(reply.status, 200);

    // Fixed: the warning goes.
    replace_file(&r.cert.cert, &good);
    replace_file(&r.cert.key, &good_key);
    eventually(
        Duration::from_secs(10),
        "the warning is cleared",
        || async move {
            let url = format!("http://{addr}/readyz");
            warning(Http::new().get(&url, &[]).await.json()).is_none()
        },
    )
    .await;
    let m = r.scrape().await;
    assert!(
        m.get("keygate_tls_certificate_reloads_total{listener=\"proxy\",result=\"error\"}") >= 2.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn client_certificates_missing_or_from_another_ca_are_refused_and_a_good_ones_subject_reaches_the_upstream(
) {
    let r = rig("tls-mtls", |c, pki| {
        c.server.tls_client_ca = Some(pki.ca_pem.display().to_string());
    })
    .await;
    let good = r.pki.client("alice", "alice");
    let stranger = Pki::new("tls-mtls-other").client("mallory", "mallory");
    let spoof = [
        ("authorization", r.auth.as_str()),
        ("x-keygate-client-cert-subject", "CN=admin"),
    ];
    for (what, tls) in [
        ("no client certificate", r.client()),
        (
            "a certificate of another CA",
            r.client().identity(&stranger),
        ),
        (
            "no client certificate, TLS 1.2",
            r.client().versions(&TLS12_ONLY),
        ),
    ] {
        // Over TLS 1.3 the client's side of the handshake ends before the server judges its
        // certificate: the refusal arrives on the first read.
        let refused = match TlsConn::open(&tls, r.keygate.proxy, Some("localhost")).await {
            Err(_) => true,
            Ok(mut conn) => conn.get("/", &spoof).await.is_err(),
        };
        assert!(refused, "{what} was served");
    }
    let mut conn = TlsConn::open(
        &r.client().identity(&good),
        r.keygate.proxy,
        Some("localhost"),
    )
    .await
    .unwrap();
    let reply = conn.get("/", &spoof).await.unwrap();
    assert_eq!(reply.status, 200);
    let seen = r.upstream.requests();
    assert_eq!(seen.len(), 1, "only the good client got through");
    let subjects: Vec<_> = seen[0]
        .headers
        .get_all("x-keygate-client-cert-subject")
        .iter()
        .collect();
    assert_eq!(subjects, ["CN=alice, O=keygate tests"]);
    let m = r.scrape().await;
    for reason in ["no_certificate", "bad_certificate"] {
        let series = format!(
            "keygate_tls_handshake_failures_total{{listener=\"proxy\",reason=\"{reason}\"}}"
        );
        assert!(m.get(&series) >= 1.0, "{series}: {}", m.text);
    }
}

#[tokio::test]
async fn optional_client_certificates_let_clients_without_one_in_with_no_subject() {
    let r = rig("tls-mtls-opt", |c, pki| {
        c.server.tls_client_ca = Some(pki.ca_pem.display().to_string());
        c.server.tls_client_auth = "optional".into();
    })
    .await;
    let spoof = [
        ("authorization", r.auth.as_str()),
        ("x-keygate-client-cert-subject", "CN=admin"),
    ];
    let reply = tls_get(&r.client(), r.keygate.proxy, "/", &spoof)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let stranger = Pki::new("tls-mtls-opt-other").client("mallory", "mallory");
    let refused = match TlsConn::open(&r.client().identity(&stranger), r.keygate.proxy, None).await
    {
        Err(_) => true,
        Ok(mut conn) => conn.get("/", &spoof).await.is_err(),
    };
    assert!(refused, "a certificate that does not verify was accepted");
    let seen = r.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0]
        .headers
        .get("x-keygate-client-cert-subject")
        .is_none());
}

/// Waits until keygate closes `read`'s connection; how long after `since` it did.
async fn closed_after(
    mut read: impl AsyncReadExt + Unpin,
    since: Instant,
    limit: Duration,
) -> Duration {
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, closed)
        .await
        .unwrap_or_else(|_| panic!("still open after {limit:?}"));
    since.elapsed()
}

/// Writes `bytes` one per second until the peer stops taking them.
async fn trickle(mut write: impl AsyncWriteExt + Unpin, bytes: Vec<u8>) {
    for b in bytes {
        if write.write_all(&[b]).await.is_err() || write.flush().await.is_err() {
            return;
        }
        // Pacing the client, not waiting for keygate.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn handshakes_and_heads_trickled_byte_by_byte_are_cut_at_the_header_timeout_from_accept() {
    let timeout = Duration::from_secs(3);
    let r = rig("tls-slow", |c, _| {
        c.server.header_read_timeout = "3s".into();
        c.server.idle_timeout = "60s".into();
    })
    .await;
    let addr: SocketAddr = r.keygate.proxy;

    // A ClientHello one byte per second.
    let since = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (read, write) = tcp.into_split();
    let writer = tokio::spawn(trickle(write, client_hello()));
    let took = closed_after(read, since, timeout + SLACK).await;
    assert!(
        took >= timeout - Duration::from_millis(50),
        "closed after {took:?}"
    );
    writer.abort();

    // A whole handshake, then a request head one byte per second: the deadline still runs
    // from accept, not from the end of the handshake.
    let since = Instant::now();
    let stream = r.client().connect(addr, Some("localhost")).await.unwrap();
    let (read, write) = tokio::io::split(stream);
    let head = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nauthorization: {}\r\n\r\n",
        r.auth
    );
    let writer = tokio::spawn(trickle(write, head.into_bytes()));
    let took = closed_after(read, since, timeout + SLACK).await;
    assert!(
        took >= timeout - Duration::from_millis(50),
        "closed after {took:?}"
    );
    writer.abort();

    // A whole handshake, then nothing.
    let since = Instant::now();
    let stream = r.client().connect(addr, Some("localhost")).await.unwrap();
    let took = closed_after(stream, since, timeout + SLACK).await;
    assert!(
        took >= timeout - Duration::from_millis(50),
        "closed after {took:?}"
    );

    let m = r.scrape().await;
    assert_eq!(
        m.get("keygate_connections_timed_out_total{kind=\"head\",listener=\"proxy\"}"),
        3.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn a_thousand_idle_tls_connections_do_not_stop_a_valid_client() {
    let r = rig("tls-idle", |c, _| {
        c.server.header_read_timeout = "60s".into();
        c.server.idle_timeout = "60s".into();
    })
    .await;
    let addr = r.keygate.proxy;
    let config = std::sync::Arc::new(r.client());
    // Half of them finish the handshake and send nothing, half send nothing at all.
    let mut idle = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let config = config.clone();
        tasks.spawn(async move {
            if i % 2 == 0 {
                Err(config.connect(addr, Some("localhost")).await.unwrap())
            } else {
                Ok(TcpStream::connect(addr).await.unwrap())
            }
        });
        if tasks.len() >= 64 {
            idle.push(tasks.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(done) = tasks.join_next().await {
        idle.push(done.unwrap());
    }
    assert_eq!(idle.len(), 1000);
    let started = Instant::now();
    let reply = tls_get(&r.client(), addr, "/", &[("authorization", &r.auth)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    eprintln!(
        "served in {:?} beside 1000 idle TLS connections",
        started.elapsed()
    );
    let m = r.scrape().await;
    assert!(
        m.get("keygate_open_connections{listener=\"proxy\"}") >= 1000.0,
        "{}",
        m.text
    );
    drop(idle);
}

#[tokio::test]
async fn the_admin_listener_speaks_tls_when_given_a_certificate() {
    let r = rig("tls-admin", |c, _| {
        c.server.admin_tls_cert = c.server.tls_cert.clone();
        c.server.admin_tls_key = c.server.tls_key.clone();
    })
    .await;
    let reply = tls_get(&r.client(), r.keygate.admin, "/metrics", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        text.contains("keygate_tls_certificate_expiry_seconds{listener=\"admin\",name=\"localhost\"} 1924992000"),
        "{text}"
    );
    let out = raw_exchange(
        r.keygate.admin,
        b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await;
    assert!(!out.contains("200"), "cleartext served: {out}");
}

#[tokio::test]
async fn the_serve_flags_turn_tls_on_and_sighup_reloads_the_certificates() {
    let pki = Pki::new("tls-flags");
    let cert = pki.server("server", &["localhost"]);
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("tls-flags");
    let (cert_path, key_path) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let kg = KeygateProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.url(),
            "--tls-cert",
            &cert_path,
            "--tls-key",
            &key_path,
        ],
        &[
            ("KEYGATE__STORE__REDIS_URL", redis.url().as_str()),
            ("KEYGATE__STORE__NAMESPACE", ns.as_str()),
        ],
        1024,
    );
    let tls = ClientTls::trusting(&pki.ca_pem);
    let reply = tls_get(&tls, kg.proxy, "/", &[]).await.unwrap();
    assert_eq!(reply.status, 401, "served over TLS, and still guarded");
    let reloads = |admin: SocketAddr| async move {
        let url = format!("http://{admin}/metrics");
        let text = Http::new().get(&url, &[]).await.text();
        Scrape::parse(&text)
            .get("keygate_tls_certificate_reloads_total{listener=\"proxy\",result=\"ok\"}")
    };
    assert_eq!(reloads(kg.admin).await, 0.0);
    // SAFETY: signals a child process this test started.
    assert_eq!(unsafe { libc::kill(kg.pid as i32, libc::SIGHUP) }, 0);
    let admin = kg.admin;
    eventually(
        Duration::from_secs(10),
        "SIGHUP reloads the certificates",
        || async move { reloads(admin).await == 1.0 },
    )
    .await;
    let reply = tls_get(&tls, kg.proxy, "/", &[]).await.unwrap();
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn the_certificate_expiry_alert_reads_a_series_a_tls_listener_exports() {
    let r = rig("tls-alert", |_, _| {}).await;
    let exported = r.scrape().await.names();
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/keygate-alerts.yml"
    ))
    .unwrap();
    let expr = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .find(|e| e.contains("keygate_tls_certificate_expiry_seconds"))
        .expect("an alert on certificate expiry");
    assert!(expr.contains("14 * 86400"), "{expr}");
    assert!(
        exported.contains("keygate_tls_certificate_expiry_seconds"),
        "{exported:?}"
    );
}
