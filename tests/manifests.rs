//! The Kubernetes manifests in `deploy/kubernetes/`, checked offline: every overlay renders
//! with `kubectl kustomize` (or the `kustomize` binary), every rendered document validates
//! against the Kubernetes schemas (`kubernetes-validate --strict`, which bundles them), and
//! keygate itself accepts what its containers are given: the flags parse with keygate's own
//! command line, the `KEYGATE__…` variables load with keygate's own config loader and compile
//! into serve settings (a variable that names no setting is an error), the probes ask the admin
//! listener's port for `/healthz` and `/readyz`, the container ports are the listeners' ports,
//! the drain fits in the termination grace period, and every file keygate is told to read is
//! mounted.
//!
//! `scripts/test.sh` installs kubectl (apt) and the pinned kubernetes-validate (pip). Without
//! them the tests are skipped with a message, except under `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;

/// The kubernetes-validate release the suite is pinned to (`scripts/test.sh` installs it).
const KUBERNETES_VALIDATE: &str = "1.37.0";
/// The longest one render or validation may take before the test fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(60);
/// The overlays a user deploys, and the Redis they share.
const OVERLAYS: [&str; 3] = ["sidecar", "gateway", "redis-sentinel"];
/// keygate's image; its tag is the crate's version.
const IMAGE: &str = "ghcr.io/keygate/keygate";
/// What a variable taken from a Secret or a field stands for while its container's settings
/// are checked (hex, as the README asks Redis passwords to be).
const SECRET_PLACEHOLDER: &str = "0123456789abcdef0123456789abcdef";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// The tools, or `None` after saying why they are missing (a failure under `CI=true`).
fn tools() -> Option<Tools> {
    let found = Tools::find();
    if let Err(msg) = &found {
        let msg = format!(
            "{msg} (scripts/test.sh installs them: apt-get install kubectl; \
             pip install kubernetes-validate=={KUBERNETES_VALIDATE})"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("skipping the manifest test: {msg}");
    }
    found.ok()
}

struct Tools {
    /// `kubectl kustomize` or `kustomize build`.
    render: Vec<String>,
}

impl Tools {
    fn find() -> Result<Tools, String> {
        let render = if works(&["kubectl", "version", "--client"]) {
            vec!["kubectl".into(), "kustomize".into()]
        } else if works(&["kustomize", "version"]) {
            vec!["kustomize".into(), "build".into()]
        } else {
            return Err("neither kubectl nor kustomize is installed".into());
        };
        let version = run(&["kubernetes-validate", "--version"], "")
            .map_err(|e| format!("kubernetes-validate is not installed: {e}"))?;
        if !version.contains(KUBERNETES_VALIDATE) {
            return Err(format!(
                "the suite is pinned to kubernetes-validate {KUBERNETES_VALIDATE}, found {}",
                version.trim()
            ));
        }
        Ok(Tools { render })
    }

    /// The overlay rendered as YAML, offline.
    fn render(&self, overlay: &str) -> String {
        let dir = manifests_dir().join(overlay);
        let mut argv: Vec<&str> = self.render.iter().map(String::as_str).collect();
        argv.push(dir.to_str().unwrap());
        run(&argv, "").unwrap_or_else(|e| panic!("{overlay} does not render: {e}"))
    }
}

fn works(argv: &[&str]) -> bool {
    run(argv, "").is_ok()
}

/// Runs `argv` with `stdin`, within [`DEADLINE`]: its stdout, or why it failed.
fn run(argv: &[&str], stdin: &str) -> Result<String, String> {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{argv:?} did not finish within {DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{argv:?} failed ({status}):\n{out}\n{err}"))
    }
}

/// The documents of a rendering, as JSON (by the YAML parser kubernetes-validate brings).
fn documents(yaml: &str) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  for d in yaml.safe_load_all(sys.stdin):\n    \
                      if d: print(json.dumps(d))";
    run(&["python3", "-c", script], yaml)
        .unwrap_or_else(|e| panic!("the rendering is not YAML: {e}"))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn rendered(tools: &Tools, overlay: &str) -> Vec<Value> {
    documents(&tools.render(overlay))
}

fn name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The pod templates of the workloads, with the workload's name.
fn pod_templates(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| {
            matches!(
                str_of(&d["kind"]),
                "Deployment" | "StatefulSet" | "DaemonSet"
            )
        })
        .map(|d| (name(d), &d["spec"]["template"]))
        .collect()
}

/// Whether `labels` has every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A container's environment as the kubelet gives it: values from Secrets and fields stand in
/// as [`SECRET_PLACEHOLDER`], and `$(NAME)` expands to a variable defined before it (`$$`
/// escapes a `$`), as Kubernetes expands them.
fn environment(container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = str_of(&var["name"]).to_owned();
        let value = match var.get("value") {
            Some(v) => expand(str_of(v), &env),
            None => SECRET_PLACEHOLDER.to_owned(),
        };
        env.push((name, value));
    }
    env
}

fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((var, after)) = tail
            .strip_prefix("$(")
            .and_then(|t| t.split_once(')'))
            .and_then(|(var, after)| {
                let value = defined.iter().rev().find(|(n, _)| n == var)?;
                Some((value.1.as_str(), after))
            })
        {
            out.push_str(var);
            rest = after;
        } else {
            // Not a reference to a variable defined before: Kubernetes leaves it as written.
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The port a probe or Service names (a number, or a port name of the container).
fn resolve_port(port: &Value, container: &Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
}

fn duration_secs(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Every way in which the keygate containers of `docs` ask keygate for something it does not
/// accept, or Kubernetes for something that would break keygate; empty when there is none.
fn keygate_problems(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut keygates = 0;
    for (workload, template) in pod_templates(docs) {
        let pod = &template["spec"];
        let containers = pod["containers"].as_array().cloned().unwrap_or_default();
        for container in &containers {
            let image = str_of(&container["image"]);
            let Some(tag) = image.strip_prefix(IMAGE).and_then(|t| t.strip_prefix(':')) else {
                continue;
            };
            keygates += 1;
            let at = format!("{workload}, container {}", str_of(&container["name"]));
            let mut problem = |p: String| problems.push(format!("{at}: {p}"));
            if tag != env!("CARGO_PKG_VERSION") {
                problem(format!(
                    "image tag {tag:?} is not keygate's version {}",
                    env!("CARGO_PKG_VERSION")
                ));
            }
            if container.get("command").is_some() {
                problem("sets `command`: the image's entrypoint is keygate".into());
            }
            let args: Vec<&str> = container["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect();
            if args.first() != Some(&"serve") {
                problem(format!("args {args:?} do not run `keygate serve`"));
            }
            let cli = match keygate::cli::Cli::try_parse_from(
                std::iter::once("keygate").chain(args.iter().copied()),
            ) {
                Ok(cli) => cli,
                Err(e) => {
                    problem(format!("keygate refuses the args {args:?}: {e}"));
                    continue;
                }
            };
            let env = environment(container);
            for (var, value) in &env {
                if var.starts_with("KEYGATE__") && value.contains("$(") {
                    problem(format!(
                        "{var} refers to a variable not defined before it: {value:?}"
                    ));
                }
            }
            let config = match cli.load_config(env) {
                Ok(config) => config,
                Err(e) => {
                    problem(format!("keygate cannot load its config: {e}"));
                    continue;
                }
            };
            let settings = match config.serve_settings() {
                Ok(settings) => settings,
                Err(e) => {
                    problem(format!("keygate refuses its settings: {e}"));
                    continue;
                }
            };

            // Ports: the kubelet reaches the pod's address, so both listeners listen on every
            // interface, and each container port is a listener's.
            for (what, addr) in [
                ("server.listen", settings.listen),
                ("server.admin_listen", settings.admin_listen),
            ] {
                if !addr.ip().is_unspecified() {
                    problem(format!(
                        "{what} {addr} is not reachable from outside the pod"
                    ));
                }
            }
            let listener_ports = [settings.listen.port(), settings.admin_listen.port()];
            let ports: Vec<u64> = container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["containerPort"].as_u64())
                .collect();
            for port in listener_ports {
                if !ports.contains(&u64::from(port)) {
                    problem(format!(
                        "no container port for keygate's listener on {port}"
                    ));
                }
            }
            for port in &ports {
                if !listener_ports.iter().any(|p| u64::from(*p) == *port) {
                    problem(format!("container port {port} is no listener of keygate"));
                }
            }

            // Probes: the admin listener's paths on the admin listener's port, in cleartext
            // unless the admin listener speaks TLS.
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &container[probe]["httpGet"];
                if get.is_null() {
                    problem(format!("no {probe} with httpGet"));
                    continue;
                }
                if get["path"] != path {
                    problem(format!(
                        "{probe} asks for {}, keygate's is {path}",
                        get["path"]
                    ));
                }
                let port = resolve_port(&get["port"], container);
                if port != Some(u64::from(settings.admin_listen.port())) {
                    problem(format!(
                        "{probe} port {} is not the admin listener's {}",
                        get["port"],
                        settings.admin_listen.port()
                    ));
                }
                let https = get["scheme"] == "HTTPS";
                if https != settings.admin_tls.is_some() {
                    problem(format!(
                        "{probe} scheme {} does not match the admin listener's TLS",
                        get["scheme"]
                    ));
                }
            }

            // Drain: the preStop sleep, then server.shutdown_grace, within the grace period.
            let pre_stop = duration_secs(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
            let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            if pre_stop == 0 {
                problem(
                    "no preStop sleep: SIGTERM would come before the pod leaves the endpoints"
                        .into(),
                );
            }
            let drain = pre_stop + settings.shutdown_grace.as_secs();
            if drain > grace {
                problem(format!(
                    "preStop {pre_stop}s + server.shutdown_grace {:?} exceed \
                     terminationGracePeriodSeconds {grace}",
                    settings.shutdown_grace
                ));
            }

            // Files keygate reads are mounted from a Secret (never by subPath, which would not
            // follow the Secret's updates).
            let files = [
                ("store.keys_file", config.store.keys_file.as_deref()),
                ("server.tls_cert", config.server.tls_cert.as_deref()),
                ("server.tls_key", config.server.tls_key.as_deref()),
            ];
            for (setting, file) in files {
                let Some(file) = file else { continue };
                let mount = container["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| {
                        let dir = str_of(&m["mountPath"]).trim_end_matches('/');
                        file.strip_prefix(dir).is_some_and(|f| f.starts_with('/'))
                    });
                let Some(mount) = mount else {
                    problem(format!("{setting} {file} is on no mounted volume"));
                    continue;
                };
                let volume = pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == mount["name"]);
                if mount.get("subPath").is_some()
                    || volume.is_none_or(|v| v["secret"]["secretName"].as_str().is_none())
                {
                    problem(format!(
                        "{setting} {file} is not a Secret mounted as a directory"
                    ));
                }
            }

            // Beside an app in one pod, keygate guards it on localhost, and the app stops only
            // after keygate's drain (the kubelet sends both SIGTERM once their preStop ends).
            for other in containers.iter().filter(|c| c["name"] != container["name"]) {
                let app_stop = duration_secs(&other["lifecycle"]["preStop"]["sleep"]["seconds"]);
                if app_stop >= grace {
                    problem(format!(
                        "container {} is killed before its preStop ({app_stop}s) ends \
                         (terminationGracePeriodSeconds {grace})",
                        other["name"]
                    ));
                }
                if app_stop < drain {
                    problem(format!(
                        "container {} stops after {app_stop}s, before keygate's drain ends \
                         ({drain}s)",
                        other["name"]
                    ));
                }
            }
            if containers.len() > 1 {
                let url = config.upstream.url.as_deref().unwrap_or_default();
                if !(url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:")) {
                    problem(format!(
                        "upstream.url {url:?}: a sidecar's app is on localhost"
                    ));
                }
            }
        }
    }
    if keygates == 0 {
        problems.push("no keygate container".into());
    }
    problems
}

/// Hardening every container of every workload has, keygate's and the others': non-root, a
/// read-only root filesystem, no privilege escalation, no capabilities, memory bounded.
fn hardening_problems(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for (workload, template) in pod_templates(docs) {
        let pod = &template["spec"];
        let all = ["initContainers", "containers"]
            .into_iter()
            .flat_map(|list| pod[list].as_array().cloned().unwrap_or_default());
        for c in all {
            let at = format!("{workload}, container {}", str_of(&c["name"]));
            let sc = &c["securityContext"];
            let non_root =
                sc["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true;
            let checks = [
                (non_root, "runAsNonRoot"),
                (
                    sc["readOnlyRootFilesystem"] == true,
                    "readOnlyRootFilesystem",
                ),
                (
                    sc["allowPrivilegeEscalation"] == false,
                    "allowPrivilegeEscalation: false",
                ),
                (
                    sc["capabilities"]["drop"] == serde_json::json!(["ALL"]),
                    "capabilities.drop [ALL]",
                ),
            ];
            for (ok, what) in checks {
                if !ok {
                    problems.push(format!("{at}: no {what}"));
                }
            }
            if str_of(&c["image"]).starts_with(IMAGE) {
                let user = sc["runAsUser"]
                    .as_u64()
                    .or(pod["securityContext"]["runAsUser"].as_u64());
                if user != Some(65532) {
                    problems.push(format!("{at}: runs as {user:?}, the image's user is 65532"));
                }
            }
            let is_init = pod["initContainers"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["name"] == c["name"]));
            if !is_init
                && (c["resources"]["requests"]["cpu"].is_null()
                    || c["resources"]["requests"]["memory"].is_null()
                    || c["resources"]["limits"]["memory"].is_null())
            {
                problems.push(format!("{at}: no cpu and memory requests and memory limit"));
            }
        }
    }
    problems
}

/// What the Services, autoscalers and disruption budgets point at exists: each Service selects
/// pods that have its target ports, each budget selects pods, each autoscaler scales a
/// workload of the rendering.
fn reference_problems(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let pods = pod_templates(docs);
    let selected = |selector: &Value| -> Vec<&Value> {
        pods.iter()
            .filter(|(_, t)| selects(selector, &t["metadata"]["labels"]))
            .map(|(_, t)| *t)
            .collect()
    };
    for doc in docs {
        let at = name(doc);
        match str_of(&doc["kind"]) {
            "Service" => {
                let pods = selected(&doc["spec"]["selector"]);
                if pods.is_empty() {
                    problems.push(format!("{at} selects no pod"));
                }
                for port in doc["spec"]["ports"].as_array().into_iter().flatten() {
                    let target = port.get("targetPort").unwrap_or(&port["port"]);
                    for pod in &pods {
                        let found = pod["spec"]["containers"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| {
                                resolve_port(target, c).is_some_and(|p| {
                                    c["ports"]
                                        .as_array()
                                        .into_iter()
                                        .flatten()
                                        .any(|cp| cp["containerPort"] == p)
                                })
                            });
                        if !found {
                            problems.push(format!("{at}: target port {target} is no container's"));
                        }
                    }
                }
            }
            "PodDisruptionBudget" | "NetworkPolicy" => {
                let selector = if doc["kind"] == "NetworkPolicy" {
                    &doc["spec"]["podSelector"]["matchLabels"]
                } else {
                    &doc["spec"]["selector"]["matchLabels"]
                };
                if selected(selector).is_empty() {
                    problems.push(format!("{at} selects no pod"));
                }
            }
            "HorizontalPodAutoscaler" => {
                let target = &doc["spec"]["scaleTargetRef"];
                let exists = docs.iter().any(|d| {
                    d["kind"] == target["kind"] && d["metadata"]["name"] == target["name"]
                });
                if !exists {
                    problems.push(format!("{at} scales {target}, which is not deployed"));
                }
            }
            _ => {}
        }
    }
    problems
}

fn kinds(docs: &[Value]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for doc in docs {
        *kinds.entry(str_of(&doc["kind"]).to_owned()).or_default() += 1;
    }
    kinds
}

#[test]
fn every_overlay_renders_offline_and_validates_against_the_kubernetes_schemas() {
    let Some(tools) = tools() else { return };
    for overlay in OVERLAYS {
        let yaml = tools.render(overlay);
        let report = run(&["kubernetes-validate", "--strict", "--quiet", "-"], &yaml)
            .unwrap_or_else(|e| panic!("{overlay} does not validate: {e}"));
        assert!(
            !report.contains("ERROR"),
            "{overlay} does not validate:\n{report}"
        );
        let docs = documents(&yaml);
        assert!(!docs.is_empty(), "{overlay} renders nothing");
        eprintln!(
            "{overlay}: {} documents valid: {:?}",
            docs.len(),
            kinds(&docs)
        );
    }
}

#[test]
fn keygate_accepts_every_flag_variable_port_and_probe_of_its_containers() {
    let Some(tools) = tools() else { return };
    for overlay in ["sidecar", "gateway"] {
        let docs = rendered(&tools, overlay);
        let problems = keygate_problems(&docs);
        assert!(problems.is_empty(), "{overlay}:\n{}", problems.join("\n"));
    }
}

#[test]
fn every_container_is_hardened_and_every_reference_resolves() {
    let Some(tools) = tools() else { return };
    for overlay in OVERLAYS {
        let docs = rendered(&tools, overlay);
        let mut problems = hardening_problems(&docs);
        problems.extend(reference_problems(&docs));
        assert!(problems.is_empty(), "{overlay}:\n{}", problems.join("\n"));
    }
}

#[test]
fn the_gateway_has_its_fleet_parts_and_the_sidecar_its_app() {
    let Some(tools) = tools() else { return };
    let gateway = kinds(&rendered(&tools, "gateway"));
    for kind in [
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "StatefulSet",
    ] {
        assert!(
            gateway.contains_key(kind),
            "the gateway has no {kind}: {gateway:?}"
        );
    }
    let sidecar = rendered(&tools, "sidecar");
    let pods = pod_templates(&sidecar);
    assert_eq!(pods.len(), 1, "the sidecar example is one workload");
    let containers = pods[0].1["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2, "the app and keygate share the pod");
    // The app publishes no port: only keygate's listeners are reachable from outside the pod.
    let app = containers
        .iter()
        .find(|c| !str_of(&c["image"]).starts_with(IMAGE))
        .unwrap();
    assert!(
        app["ports"].is_null(),
        "the app publishes a port: {}",
        app["ports"]
    );
}

/// A deliberate mistake made in a container.
type Mutation = fn(&mut Value);

/// The first container of the rendering's Deployment (keygate's, in the gateway).
fn keygate_container(docs: &mut [Value]) -> &mut Value {
    docs.iter_mut()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| &mut d["spec"]["template"]["spec"]["containers"][0])
        .unwrap()
}

/// The checks bite: a probe path keygate does not serve, a variable that names no setting, a
/// flag it does not have, and a probe on the proxy port are each reported.
#[test]
fn a_wrong_probe_path_variable_flag_or_port_is_reported() {
    let Some(tools) = tools() else { return };
    let good = rendered(&tools, "gateway");
    let mutations: [(&str, Mutation, &str); 4] = [
        (
            "probe path",
            |c| c["livenessProbe"]["httpGet"]["path"] = "/health".into(),
            "livenessProbe asks for \"/health\"",
        ),
        (
            "env name",
            |c| {
                c["env"].as_array_mut().unwrap().push(serde_json::json!(
                    {"name": "KEYGATE__SERVER__LISTN", "value": "0.0.0.0:8080"}
                ))
            },
            "server.listn",
        ),
        (
            "flag",
            |c| c["args"].as_array_mut().unwrap().push("--listen-on".into()),
            "keygate refuses the args",
        ),
        (
            "probe port",
            |c| c["readinessProbe"]["httpGet"]["port"] = "http".into(),
            "readinessProbe port \"http\" is not the admin listener's 9090",
        ),
    ];
    for (what, mutate, expected) in mutations {
        let mut docs = good.clone();
        mutate(keygate_container(&mut docs));
        let problems = keygate_problems(&docs).join("\n");
        assert!(
            problems.contains(expected),
            "a wrong {what} was not reported as {expected:?}:\n{problems}"
        );
    }
}
