//! The command line: `keygate serve`, `keygate demo` and the key-management commands.
//! Settings come from `--config`, `KEYGATE__SECTION__FIELD` variables and flags, flags winning.
//! Management commands print tables for people and JSON with `--output json`; a new key is
//! printed exactly once.
//!
//! `args` defines the commands and flags, this file runs them (one function per command
//! group), `print` prints what they return, and `demo` is the demo with its echo upstream.

use anyhow::Context;

use crate::config::Config;
use crate::manage::{self, NewKey, NewServiceAccount, RotateExpiry};
use crate::server::Server;
use crate::store::{self, now_unix};
use crate::telemetry;

mod args;
mod demo;
mod print;

pub use args::Cli;
use args::{AccountsCommand, Command, KeysCommand, Output};
pub use print::{redact_keys, report};

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.load_config(std::env::vars())?;
    match cli.command {
        Command::Serve(_) => serve(&config).await,
        Command::Demo(args) => {
            let server = demo::start(config, args).await?;
            server.run(shutdown_signal()).await;
            Ok(())
        }
        Command::Keys(k) => keys(&config, k.command, k.output.output).await,
        Command::ServiceAccounts(a) => accounts(&config, a.command, a.output.output).await,
        Command::Audit { limit, output } => audit(&config, limit, output.output).await,
    }
}

impl Cli {
    /// The configuration this command line runs with: `--config`, then the
    /// `KEYGATE__SECTION__FIELD` variables of `env`, then the flags. A variable or value that
    /// names no setting is kept in [`Config::load_errors`], so compiling the result fails.
    pub fn load_config(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, crate::config::ConfigError> {
        let mut config = Config::load(self.config.as_deref(), env, &self.overrides())?;
        // `--redis-url` on the command line picks Redis even when the config names a keys file.
        if self.redis_url.is_some() && self.keys_file.is_none() {
            config.store.keys_file = None;
        }
        Ok(config)
    }
}

/// `keygate serve`: the proxy and the admin listener, until SIGTERM or SIGINT.
async fn serve(config: &Config) -> anyhow::Result<()> {
    let settings = config.serve_settings()?;
    telemetry::init(&settings.log);
    tracing::info!(config = %config.redacted_json(), "effective configuration");
    let server = Server::bind(settings).await?;
    server.run(shutdown_signal()).await;
    Ok(())
}

/// `keygate keys …`: user keys.
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
            print::created_key(&created, output);
        }
        KeysCommand::List { tenant } => {
            let records = manage::list_keys(store, tenant.as_deref()).await?;
            print::keys(&records, output)?;
        }
        KeysCommand::Show { id } => {
            let record = manage::show_key(store, &id).await?;
            print::key(&record, output)?;
        }
        KeysCommand::Revoke { id } => {
            let revoked = manage::revoke_key(store, &id, now, manage::CLI_ACTOR).await?;
            print::revoked(&revoked, output)?;
        }
    }
    Ok(())
}

/// `keygate service-accounts …`: service accounts and their keys.
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
            print::account_key(&created, "Created", output);
        }
        AccountsCommand::List { tenant } => {
            let accounts = manage::list_service_accounts(store, tenant.as_deref()).await?;
            print::accounts(&accounts, output)?;
        }
        AccountsCommand::Show { id } => {
            let (account, keys) = manage::show_service_account(store, &id).await?;
            print::account(&account, &keys, output)?;
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
            print::account_key(&rotated, "Rotated", output);
            let until = grace
                .filter(|g| !g.is_zero())
                .map(|g| now + g.as_secs().max(1));
            print::previous_key(until, output);
        }
        AccountsCommand::Remove { id } => {
            let account = manage::remove_service_account(store, &id, now, actor).await?;
            print::removed_account(&account, output)?;
        }
    }
    Ok(())
}

/// `keygate audit`: the latest entries of the audit trail.
async fn audit(config: &Config, limit: usize, output: Output) -> anyhow::Result<()> {
    let store = store::open(&config.store_settings()?, true).context("opening the key store")?;
    let entries = manage::list_audit(&*store, limit).await?;
    print::audit(&entries, output)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
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
