//! The command line: `keygate serve` and the key-management commands. Settings come from
//! `--config`, `KEYGATE__SECTION__FIELD` variables and flags, flags winning. Management commands
//! print tables for people and JSON with `--output json`; a new key is printed exactly once.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::config::{Config, Override};

mod demo;
use crate::manage::{self, CreatedAccount, CreatedKey, NewKey, NewServiceAccount, RotateExpiry};
use crate::policy;
use crate::server::Server;
use crate::store::{self, format_time, now_unix, KeyRecord, ServiceAccount};
use crate::telemetry;

/// keygate: bearer API key authentication in front of HTTP services.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, propagate_version = true)]
pub struct Cli {
    /// TOML config file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Redis URL of the key store (store.redis_url).
    #[arg(long, global = true, value_name = "URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key (store.namespace).
    #[arg(long, global = true, value_name = "NAME")]
    namespace: Option<String>,
    /// Use the embedded file store at PATH instead of Redis (store.keys_file).
    #[arg(long, global = true, value_name = "PATH")]
    keys_file: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// `--output`, a flag of the management commands only (`serve` and `demo` print no records).
#[derive(Debug, Args)]
struct OutputArg {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable tables.
    Table,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy and the admin listener.
    Serve(ServeArgs),
    /// Try keygate: a file store, a fresh key and a built-in echo upstream, no Redis needed.
    Demo(DemoArgs),
    /// Manage user API keys.
    Keys(KeysArgs),
    /// Manage service accounts (non-user accounts of a tenant, for agents, CI and workers).
    #[command(name = "service-accounts", alias = "sa")]
    ServiceAccounts(AccountsArgs),
    /// Show the audit trail of key-management changes (never a key).
    Audit {
        /// How many of the latest entries to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Debug, Args)]
struct KeysArgs {
    #[command(flatten)]
    output: OutputArg,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Args)]
struct AccountsArgs {
    #[command(flatten)]
    output: OutputArg,
    #[command(subcommand)]
    command: AccountsCommand,
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// Create a service account and its key; the key is printed once and cannot be shown again.
    Create {
        /// Tenant (organization) of the account.
        #[arg(long)]
        tenant: String,
        /// Name, unique within the tenant (regardless of case).
        #[arg(long)]
        name: String,
        /// Role of the account's keys: a role of the configuration, but never the organization
        /// admin role `admin`.
        #[arg(long)]
        role: String,
        /// Lifetime of the key, e.g. 90d (default: never expires).
        #[arg(long, value_name = "DURATION", conflicts_with = "never_expire")]
        expires_in: Option<String>,
        /// The key never expires (the default, stated explicitly).
        #[arg(long)]
        never_expire: bool,
    },
    /// List service accounts.
    List {
        /// Only this tenant's accounts.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show a service account and its keys (never the keys themselves).
    Show {
        /// Service account id (sa_…).
        id: String,
    },
    /// Issue a new key; the old one stops working at once, or after --grace. The new key is
    /// printed once.
    Rotate {
        /// Service account id (sa_…).
        id: String,
        /// Lifetime of the new key (default: the same lifetime as the old key).
        #[arg(long, value_name = "DURATION", conflicts_with = "never_expire")]
        expires_in: Option<String>,
        /// The new key never expires.
        #[arg(long)]
        never_expire: bool,
        /// Keep the old key working this long, e.g. 10m (default: revoke it now).
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
    },
    /// Delete a service account and revoke all its keys.
    Remove {
        /// Service account id (sa_…).
        id: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Proxy listener address (server.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin listener address (server.admin_listen).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// The upstream every authenticated request goes to (upstream.url).
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Proxy listener address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Admin listener address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    admin_listen: String,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a user key; the key is printed once and cannot be shown again.
    Create {
        /// Tenant the key is bound to.
        #[arg(long)]
        tenant: String,
        /// The key's role in the tenant: a role of the configuration (built in: admin, member,
        /// readonly; `[roles.*]` in the config file) or the admin API's admin-readonly.
        #[arg(long)]
        role: String,
        /// A name for bookkeeping.
        #[arg(long)]
        name: String,
        /// Who the key acts for (default: the key id).
        #[arg(long)]
        subject: Option<String>,
        /// Lifetime, e.g. 30d, 12h (default: never expires).
        #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// Expiry as RFC 3339 UTC, e.g. 2030-01-01T00:00:00Z.
        #[arg(long, value_name = "TIME")]
        expires_at: Option<String>,
    },
    /// List keys (never the keys themselves).
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show one key's information.
    Show {
        /// Key id (key_…).
        id: String,
    },
    /// Revoke a key by id.
    Revoke {
        /// Key id (key_…).
        id: String,
    },
}

impl Cli {
    fn overrides(&self) -> Vec<Override> {
        let mut o: Vec<Override> = Vec::new();
        let mut push = |section, field, v: &Option<String>| {
            if let Some(v) = v {
                o.push((section, field, v.clone()));
            }
        };
        push("store", "redis_url", &self.redis_url);
        push("store", "namespace", &self.namespace);
        push("store", "keys_file", &self.keys_file);
        if let Command::Serve(s) = &self.command {
            push("server", "listen", &s.listen);
            push("server", "admin_listen", &s.admin_listen);
            push("upstream", "url", &s.upstream);
        }
        o
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref(), std::env::vars(), &cli.overrides())?;
    // `--redis-url` on the command line picks Redis even when the config names a keys file.
    if cli.redis_url.is_some() && cli.keys_file.is_none() {
        config.store.keys_file = None;
    }
    match cli.command {
        Command::Serve(_) => {
            let settings = config.serve_settings()?;
            telemetry::init(&settings.log);
            tracing::info!(config = %config.redacted_json(), "effective configuration");
            let server = Server::bind(settings).await?;
            server.run(shutdown_signal()).await;
            Ok(())
        }
        Command::Demo(args) => demo(config, args).await,
        Command::Keys(k) => keys(&config, k.command, k.output.output).await,
        Command::ServiceAccounts(a) => accounts(&config, a.command, a.output.output).await,
        Command::Audit { limit, output } => audit(&config, limit, output.output).await,
    }
}

/// An error for the terminal: each cause once (an error that already ends with its cause in
/// its own message is not followed by it again), and nothing shaped like a key.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    redact_keys(&out)
}

/// Replaces every run that starts with a key prefix (`kgu_`, `kgs_`, in any case) by the prefix
/// and `[redacted]`: a safety net under every message the binary prints on error, clap's
/// included (`keygate kgu_…` would otherwise be repeated as an unknown command).
pub fn redact_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_prefix(rest) {
        out.push_str(&rest[..at + 4]);
        out.push_str("[redacted]");
        let tail = &rest[at + 4..];
        let end = tail
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn find_prefix(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(3)).find(|&i| {
        b[i].eq_ignore_ascii_case(&b'k')
            && b[i + 1].eq_ignore_ascii_case(&b'g')
            && (b[i + 2].eq_ignore_ascii_case(&b'u') || b[i + 2].eq_ignore_ascii_case(&b's'))
            && b[i + 3] == b'_'
    })
}

/// Default keys file of `keygate demo`.
const DEMO_KEYS_FILE: &str = "demo-keys.toml";

async fn demo(mut config: Config, args: DemoArgs) -> anyhow::Result<()> {
    config.server.listen = args.listen;
    config.server.admin_listen = args.admin_listen;
    let keys_file = config
        .store
        .keys_file
        .get_or_insert_with(|| DEMO_KEYS_FILE.into())
        .clone();
    let identity = config.identity_settings()?;
    let echo = demo::start_echo(identity).await?;
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
    server.run(shutdown_signal()).await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn keys(config: &Config, cmd: KeysCommand, output: Output) -> anyhow::Result<()> {
    let store = store::open(&config.store_settings()?, true).context("opening the key store")?;
    let store = &*store;
    let now = now_unix();
    match cmd {
        KeysCommand::Create {
            tenant,
            role,
            name,
            subject,
            expires_in,
            expires_at,
        } => {
            let expires_at =
                manage::parse_expiry(expires_in.as_deref(), expires_at.as_deref(), now)?;
            let created = manage::create_key(
                store,
                &config.known_roles()?,
                NewKey {
                    tenant,
                    role,
                    name,
                    subject,
                    expires_at,
                },
                now,
                manage::CLI_ACTOR,
            )
            .await?;
            print_created(&created, output);
        }
        KeysCommand::List { tenant } => {
            let records = manage::list_keys(store, tenant.as_deref()).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                Output::Table => print_table(&records),
            }
        }
        KeysCommand::Show { id } => {
            let record = manage::show_key(store, &id).await?;
            print_record(&record, output)?;
        }
        KeysCommand::Revoke { id } => {
            let revoked = manage::revoke_key(store, &id, now, manage::CLI_ACTOR).await?;
            let record = &revoked.record;
            if output == Output::Table {
                if revoked.already {
                    println!(
                        "Key {} was already revoked, at {}; nothing changed.",
                        record.id,
                        time_or(record.revoked_at, "an unknown time")
                    );
                } else {
                    println!("Revoked key {}.", record.id);
                }
            }
            print_record(record, output)?;
        }
    }
    Ok(())
}

async fn accounts(config: &Config, cmd: AccountsCommand, output: Output) -> anyhow::Result<()> {
    let store = store::open(&config.store_settings()?, true).context("opening the key store")?;
    let store = &*store;
    let now = now_unix();
    let actor = manage::CLI_ACTOR;
    match cmd {
        AccountsCommand::Create {
            tenant,
            name,
            role,
            expires_in,
            never_expire: _,
        } => {
            let expires_at = manage::parse_expiry(expires_in.as_deref(), None, now)?;
            let new = NewServiceAccount {
                tenant,
                name,
                role,
                expires_at,
            };
            let roles = config.known_roles()?;
            let created = manage::create_service_account(store, &roles, new, now, actor).await?;
            print_account_key(&created, "Created", output);
        }
        AccountsCommand::List { tenant } => {
            let accounts = manage::list_service_accounts(store, tenant.as_deref()).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&accounts)?),
                Output::Table => print_accounts(&accounts),
            }
        }
        AccountsCommand::Show { id } => {
            let (account, keys) = manage::show_service_account(store, &id).await?;
            match output {
                Output::Json => {
                    let mut v = serde_json::to_value(&account)?;
                    v["keys"] = serde_json::to_value(&keys)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                Output::Table => {
                    print_accounts(std::slice::from_ref(&account));
                    println!();
                    print_table(&keys);
                }
            }
        }
        AccountsCommand::Rotate {
            id,
            expires_in,
            never_expire,
            grace,
        } => {
            let expiry = match (
                never_expire,
                manage::parse_expiry(expires_in.as_deref(), None, now)?,
            ) {
                (true, _) => RotateExpiry::Never,
                (false, Some(at)) => RotateExpiry::At(at),
                (false, None) => RotateExpiry::SameLifetime,
            };
            let grace = grace
                .as_deref()
                .map(manage::parse_grace)
                .transpose()
                .context("--grace")?;
            let rotated =
                manage::rotate_service_account(store, &id, expiry, grace, now, actor).await?;
            print_account_key(&rotated, "Rotated", output);
            if output == Output::Table {
                match grace {
                    Some(g) if !g.is_zero() => println!(
                        "The previous key keeps working until {}.",
                        format_time(now + g.as_secs().max(1))
                    ),
                    _ => println!("The previous key no longer works."),
                }
            }
        }
        AccountsCommand::Remove { id } => {
            let account = manage::remove_service_account(store, &id, now, actor).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&account)?),
                Output::Table => println!(
                    "Removed service account {} ({:?}); all its keys are revoked.",
                    account.id, account.name
                ),
            }
        }
    }
    Ok(())
}

async fn audit(config: &Config, limit: usize, output: Output) -> anyhow::Result<()> {
    let store = store::open(&config.store_settings()?, true).context("opening the key store")?;
    let entries = manage::list_audit(&*store, limit).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        format_time(e.at),
                        e.actor.clone(),
                        e.action.clone(),
                        e.target.clone(),
                        e.tenant.clone(),
                        e.outcome.clone(),
                    ]
                })
                .collect();
            print_rows(
                &["TIME", "ACTOR", "ACTION", "TARGET", "TENANT", "OUTCOME"],
                &rows,
            );
        }
    }
    Ok(())
}

/// Prints a service account's new key once, with the warning that it cannot be shown again.
fn print_account_key(created: &CreatedAccount, verb: &str, output: Output) {
    let a = &created.account;
    let key = created.key.secret.expose();
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(a).expect("accounts serialise");
            v["key"] = json!(key);
            v["key_id"] = json!(created.key.record.id);
            v["key_shown_once"] = json!(true);
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Output::Table => {
            println!(
                "{verb} service account {} ({:?}) in tenant {} with role {}; key {} expires {}.",
                a.id,
                a.name,
                a.tenant,
                a.role,
                created.key.record.id,
                time_or(a.expires_at, "never")
            );
            print_secret(key);
        }
    }
}

fn print_accounts(accounts: &[ServiceAccount]) {
    let rows: Vec<Vec<String>> = accounts
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.name.clone(),
                a.tenant.clone(),
                a.role.clone(),
                a.key_id.clone(),
                time_or(a.expires_at, "never"),
            ]
        })
        .collect();
    print_rows(&["ID", "NAME", "TENANT", "ROLE", "KEY", "EXPIRES"], &rows);
}

fn print_created(created: &CreatedKey, output: Output) {
    let r = &created.record;
    let key = created.secret.expose();
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(r).expect("records serialise");
            v["key"] = json!(key);
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Output::Table => {
            println!(
                "Created key {} ({:?}) for tenant {} with role {}, expires {}.",
                r.id,
                r.name,
                r.tenant,
                r.role,
                time_or(r.expires_at, "never")
            );
            print_secret(key);
        }
    }
}

fn print_record(r: &KeyRecord, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(r)?),
        Output::Table => {
            let rows = [
                ("id", r.id.clone()),
                ("name", r.name.clone()),
                ("tenant", r.tenant.clone()),
                ("role", r.role.clone()),
                ("subject", r.subject.clone()),
                ("kind", r.kind.as_str().into()),
                ("created", format_time(r.created_at)),
                ("expires", time_or(r.expires_at, "never")),
                ("revoked", time_or(r.revoked_at, "no")),
                ("last used", time_or(r.last_used_at, "never")),
            ];
            for (k, v) in rows {
                println!("{k:<9} {v}");
            }
        }
    }
    Ok(())
}

fn print_table(records: &[KeyRecord]) {
    let header = [
        "ID",
        "NAME",
        "TENANT",
        "ROLE",
        "EXPIRES",
        "REVOKED",
        "LAST USED",
    ];
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.name.clone(),
                r.tenant.clone(),
                r.role.clone(),
                time_or(r.expires_at, "never"),
                time_or(r.revoked_at, "-"),
                time_or(r.last_used_at, "never"),
            ]
        })
        .collect();
    print_rows(&header, &rows);
}

/// A time for people, or `none` when unset.
fn time_or(t: Option<u64>, none: &str) -> String {
    t.map(format_time).unwrap_or_else(|| none.into())
}

/// Prints a new key, with the warning that it is shown only now.
fn print_secret(key: &str) {
    println!();
    println!("    {key}");
    println!();
    println!("This key is shown once: store it now. It cannot be shown again.");
}

fn print_rows(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_show_each_cause_once_and_no_key() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(io).context("cannot listen: Address already in use");
        assert_eq!(report(&e), "cannot listen: Address already in use");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(report(&e), "outer: inner");
        let key = crate::key::generate(crate::key::KeyKind::User);
        let text = format!(
            "unrecognized subcommand '{}' and KGS_abc",
            key.secret.expose()
        );
        assert_eq!(
            redact_keys(&text),
            "unrecognized subcommand 'kgu_[redacted]' and KGS_[redacted]"
        );
        assert_eq!(redact_keys("kg_ kgu"), "kg_ kgu");
    }
}
