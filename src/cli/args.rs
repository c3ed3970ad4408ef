//! The command line's arguments: the clap definitions of every command and flag, and the
//! settings the flags give (`--listen` is `server.listen`), for the configuration to merge.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Override;

/// keygate: bearer API key authentication in front of HTTP services.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, propagate_version = true)]
pub struct Cli {
    /// TOML config file.
    #[arg(long, global = true, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
    /// Redis URL of the key store (store.redis_url).
    #[arg(long, global = true, value_name = "URL")]
    pub(super) redis_url: Option<String>,
    /// Prefix of every Redis key (store.namespace).
    #[arg(long, global = true, value_name = "NAME")]
    pub(super) namespace: Option<String>,
    /// Use the embedded file store at PATH instead of Redis (store.keys_file).
    #[arg(long, global = true, value_name = "PATH")]
    pub(super) keys_file: Option<String>,
    #[command(subcommand)]
    pub(super) command: Command,
}

/// `--output`, a flag of the management commands only (`serve` and `demo` print no records).
#[derive(Debug, Args)]
pub(super) struct OutputArg {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub(super) output: Output,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Output {
    /// Human-readable tables.
    Table,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
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
pub(super) struct KeysArgs {
    #[command(flatten)]
    pub(super) output: OutputArg,
    #[command(subcommand)]
    pub(super) command: KeysCommand,
}

#[derive(Debug, Args)]
pub(super) struct AccountsArgs {
    #[command(flatten)]
    pub(super) output: OutputArg,
    #[command(subcommand)]
    pub(super) command: AccountsCommand,
}

#[derive(Debug, Subcommand)]
pub(super) enum AccountsCommand {
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
pub(super) struct ServeArgs {
    /// Proxy listener address (server.listen).
    #[arg(long, value_name = "ADDR")]
    pub(super) listen: Option<String>,
    /// Admin listener address (server.admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub(super) admin_listen: Option<String>,
    /// The decision endpoint's address, for gateways that delegate key checks to keygate
    /// (server.authz_listen; off unless set).
    #[arg(long, value_name = "ADDR")]
    pub(super) authz_listen: Option<String>,
    /// How the decision endpoint's caller names the request it checks: request (Envoy HTTP),
    /// grpc (Envoy gRPC, Istio), nginx, or forward_auth (Traefik, Caddy) (server.authz_caller).
    #[arg(long, value_name = "CALLER")]
    pub(super) authz_caller: Option<String>,
    /// The upstream every authenticated request goes to (upstream.url).
    #[arg(long, value_name = "URL")]
    pub(super) upstream: Option<String>,
    /// PEM certificate chain: the proxy listener speaks TLS (server.tls_cert, with --tls-key).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub(super) tls_cert: Option<String>,
    /// PEM private key of --tls-cert (server.tls_key).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub(super) tls_key: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// Proxy listener address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub(super) listen: String,
    /// Admin listener address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    pub(super) admin_listen: String,
}

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
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
    pub(super) fn overrides(&self) -> Vec<Override> {
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
            push("server", "authz_listen", &s.authz_listen);
            push("server", "authz_caller", &s.authz_caller);
            push("upstream", "url", &s.upstream);
            push("server", "tls_cert", &s.tls_cert);
            push("server", "tls_key", &s.tls_key);
        }
        o
    }
}
