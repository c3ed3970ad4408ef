//! What the command line prints: records as tables for people or as JSON (`--output json`), a
//! new key exactly once with its warning, and errors for the terminal with anything shaped like
//! a key masked.

use serde_json::json;

use super::args::Output;
use crate::manage::{CreatedAccount, CreatedKey, Revocation};
use crate::store::{format_time, AuditEntry, KeyRecord, ServiceAccount};

/// A new user key, printed once.
pub(super) fn created_key(created: &CreatedKey, output: Output) {
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
            secret(key);
        }
    }
}

/// Keys (never the keys themselves), one row each.
pub(super) fn keys(records: &[KeyRecord], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(records)?),
        Output::Table => key_table(records),
    }
    Ok(())
}

/// One key's information, a line per attribute.
pub(super) fn key(r: &KeyRecord, output: Output) -> anyhow::Result<()> {
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

/// A revocation, saying whether it changed anything, then the key.
pub(super) fn revoked(revoked: &Revocation, output: Output) -> anyhow::Result<()> {
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
    key(record, output)
}

/// A service account's new key, printed once; `verb` says how it came (`Created`, `Rotated`).
pub(super) fn account_key(created: &CreatedAccount, verb: &str, output: Output) {
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
            secret(key);
        }
    }
}

/// After a rotation: until when the previous key keeps working (`until`), or that it stopped.
pub(super) fn previous_key(until: Option<u64>, output: Output) {
    if output == Output::Table {
        match until {
            Some(at) => println!("The previous key keeps working until {}.", format_time(at)),
            None => println!("The previous key no longer works."),
        }
    }
}

/// Service accounts, one row each.
pub(super) fn accounts(accounts: &[ServiceAccount], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(accounts)?),
        Output::Table => account_table(accounts),
    }
    Ok(())
}

/// One service account and its keys (never the keys themselves).
pub(super) fn account(
    account: &ServiceAccount,
    keys: &[KeyRecord],
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(account)?;
            v["keys"] = serde_json::to_value(keys)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            account_table(std::slice::from_ref(account));
            println!();
            key_table(keys);
        }
    }
    Ok(())
}

/// A removed service account.
pub(super) fn removed_account(account: &ServiceAccount, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(account)?),
        Output::Table => println!(
            "Removed service account {} ({:?}); all its keys are revoked.",
            account.id, account.name
        ),
    }
    Ok(())
}

/// Audit entries, one row each (they never hold a key).
pub(super) fn audit(entries: &[AuditEntry], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(entries)?),
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
            table(
                &["TIME", "ACTOR", "ACTION", "TARGET", "TENANT", "OUTCOME"],
                &rows,
            );
        }
    }
    Ok(())
}

fn account_table(accounts: &[ServiceAccount]) {
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
    table(&["ID", "NAME", "TENANT", "ROLE", "KEY", "EXPIRES"], &rows);
}

fn key_table(records: &[KeyRecord]) {
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
    table(&header, &rows);
}

/// A time for people, or `none` when unset.
fn time_or(t: Option<u64>, none: &str) -> String {
    t.map(format_time).unwrap_or_else(|| none.into())
}

/// Prints a new key, with the warning that it is shown only now.
fn secret(key: &str) {
    println!();
    println!("    {key}");
    println!();
    println!("This key is shown once: store it now. It cannot be shown again.");
}

/// A table: the header, then each row, in columns as wide as their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
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
