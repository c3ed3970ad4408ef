//! `keygate demo`: a first run with nothing installed. It starts a built-in echo upstream,
//! keeps keys in the embedded file store, creates an admin key, prints it once with the curl
//! commands to try it, and serves until Ctrl-C. The echo upstream answers every request with a
//! small JSON document of what it received (method, path and keygate's identity headers), so a
//! first run shows what an upstream behind keygate sees.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::args::DemoArgs;
use crate::config::Config;
use crate::manage::{self, NewKey};
use crate::policy;
use crate::proxy::IdentitySettings;
use crate::server::Server;
use crate::store::{self, now_unix};
use crate::telemetry;

/// Default keys file of `keygate demo`.
const DEMO_KEYS_FILE: &str = "demo-keys.toml";

/// Starts `keygate demo`: the echo upstream, a fresh key printed once, and a server bound to
/// the demo's addresses, for the caller to run.
pub(super) async fn start(mut config: Config, args: DemoArgs) -> anyhow::Result<Server> {
    config.server.listen = args.listen;
    config.server.admin_listen = args.admin_listen;
    let keys_file = config
        .store
        .keys_file
        .get_or_insert_with(|| DEMO_KEYS_FILE.into())
        .clone();
    let identity = config.identity_settings()?;
    let echo = start_echo(identity).await?;
    config.upstream.url = Some(format!("http://{echo}"));
    let settings = config.serve_settings()?;
    telemetry::init(&settings.log);

    let store = store::open(&settings.store, true)?;
    let created = manage::create_key(
        &*store,
        &config.known_roles()?,
        NewKey {
            tenant: "demo".into(),
            role: policy::ADMIN.into(),
            name: "keygate demo".into(),
            subject: Some("demo-user".into()),
            expires_at: None,
        },
        now_unix(),
        manage::CLI_ACTOR,
    )
    .await?;
    let server = Server::bind_with_store(settings, store).await?;
    let url = format!("http://{}/hello", server.proxy_addr());
    let key = created.secret.expose();
    println!(
        "keygate demo is running: proxy on http://{}, admin on http://{}",
        server.proxy_addr(),
        server.admin_addr()
    );
    println!("  keys file: {keys_file} (the embedded file store; no Redis needed)");
    println!("  upstream:  a built-in echo service on http://{echo}");
    println!();
    println!(
        "A key was created for you ({}). It is shown once:",
        created.record.id
    );
    println!();
    println!("    {key}");
    println!();
    println!("Try it from another terminal:");
    println!();
    println!("    curl -i -H 'Authorization: Bearer {key}' {url}");
    println!("    curl -i {url}");
    println!();
    println!("Press Ctrl-C to stop.");
    Ok(server)
}

/// Starts the echo upstream on `127.0.0.1:0` and returns its address.
async fn start_echo(identity: IdentitySettings) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let identity = identity.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let body = echo(&identity, &req);
                    async move { Ok::<_, Infallible>(body) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn echo(ids: &IdentitySettings, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let h = req.headers();
    let get = |name: &http::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "identity": {
            "key_id": get(&ids.key_id),
            "tenant": get(&ids.tenant),
            "role": get(&ids.role),
            "subject": get(&ids.subject),
            "subject_kind": get(&ids.subject_kind),
        },
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
