//! `relayctl` against `relay-node --dev`: the admin token the dev node writes, the policy as
//! a file (export, diff, apply), explain, tokens, approvals and the audit log, in tables and
//! JSON, with the exit codes scripts rely on.

mod common;

use anyhow::{Context, Result, ensure};
use common::{client, message, post};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use test_support::{RelayNode, workspace_binary};

/// The token file a dev node names on stderr.
fn dev_token_file(node: &RelayNode) -> Result<PathBuf> {
    let out = node.output()?;
    let line = out
        .lines()
        .find(|l| l.contains("management API admin token in "))
        .context("the dev node names no token file")?;
    let rest = line.split("admin token in ").nth(1).context("token line")?;
    Ok(PathBuf::from(rest.split(' ').next().context("path")?))
}

struct Ctl {
    api: String,
    token_file: PathBuf,
}

impl Ctl {
    /// Runs relayctl; its exit code, stdout and stderr.
    fn run(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(workspace_binary("relayctl")?)
            .arg("--api")
            .arg(&self.api)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(args)
            .env_remove("FEDRELAY_TOKEN")
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.run(&all)?;
        ensure!(code == 0, "relayctl {args:?}: exit {code}: {err}");
        Ok(serde_json::from_str(&out)?)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    Ok(std::fs::write(path, text)?)
}

#[tokio::test]
async fn relayctl_manages_the_policy_as_a_file_with_exit_codes_scripts_can_trust() -> Result<()> {
    let node = RelayNode::start_dev()?;
    let ctl = Ctl {
        api: node.api_url(),
        token_file: dev_token_file(&node)?,
    };
    let dir = tempfile::tempdir()?;

    let who = ctl.json(&["whoami"])?;
    ensure!(
        who["role"] == "admin" && who["name"] == "bootstrap",
        "{who}"
    );
    let (code, table, _) = ctl.run(&["whoami"])?;
    ensure!(
        code == 0 && table.starts_with("NAME") && table.contains("admin"),
        "{table}"
    );

    // Export: the policy the dev config implies, as TOML that reads back.
    let file = dir.path().join("policy.toml");
    let (code, _, err) = ctl.run(&["policy", "export", "--out", file.to_str().context("path")?])?;
    ensure!(code == 0, "{err}");
    let exported = std::fs::read_to_string(&file)?;
    ensure!(
        exported.contains("alpha.example") && exported.contains("config-1"),
        "{exported}"
    );
    // Unchanged: diff says so and exits 0.
    let (code, out, err) = ctl.run(&["policy", "diff", file.to_str().context("path")?])?;
    ensure!(
        code == 0 && out.starts_with("no changes"),
        "{code} {out} {err}"
    );

    // A deny rule added to the file: diff shows it and exits 2; nothing is applied yet.
    let edited = format!(
        "{exported}\n[[rules]]\nid = \"quiet\"\nbetween = [\"alpha.example\", \"beta.example\"]\naction = \"deny\"\n"
    );
    write(&file, &edited)?;
    let (code, out, _) = ctl.run(&["policy", "diff", file.to_str().context("path")?])?;
    ensure!(code == 2 && out.contains("+ rule quiet"), "{code} {out}");
    let e = ctl.json(&["explain", "alice@alpha.example", "bob@beta.example"])?;
    ensure!(
        e["allowed"] == true && e["decided_by"]["id"] == "config-1",
        "{e}"
    );
    let c = client()?;
    let (s, v) = post(
        &c,
        &node.http_url(),
        "alpha.example",
        "alpha-demo-secret-0123456789",
        &message("m1", "alice", "bob@beta.example", "before the apply"),
    )
    .await?;
    ensure!(s == 202, "{s} {v}");

    // Applied: the next message is refused, explain names the rule, the audit log has it.
    let (code, out, err) = ctl.run(&["policy", "apply", file.to_str().context("path")?])?;
    ensure!(code == 0 && out.contains("applied"), "{code} {out} {err}");
    let (s, v) = post(
        &c,
        &node.http_url(),
        "alpha.example",
        "alpha-demo-secret-0123456789",
        &message("m2", "alice", "bob@beta.example", "after the apply"),
    )
    .await?;
    ensure!(s == 403, "{s} {v}");
    let (code, out, _) = ctl.run(&["explain", "alice@alpha.example", "bob@beta.example"])?;
    ensure!(
        code == 0 && out.starts_with("refused") && out.contains("quiet"),
        "{out}"
    );
    let audit = ctl.json(&["audit"])?;
    let last = audit["entries"]
        .as_array()
        .and_then(|e| e.last())
        .context("audit")?;
    ensure!(
        last["action"] == "policy.import" && last["who"] == "bootstrap",
        "{last}"
    );
    // Applying the same file again changes nothing.
    let (code, out, _) = ctl.run(&["policy", "apply", file.to_str().context("path")?])?;
    ensure!(code == 0 && out.starts_with("no changes"), "{out}");

    // A stale --if-version is refused (3), an invalid file is a local error (1).
    let (code, _, err) = ctl.run(&[
        "policy",
        "apply",
        file.to_str().context("path")?,
        "--if-version",
        "1",
    ])?;
    ensure!(code == 3 && err.contains("version"), "{code} {err}");
    let bad = dir.path().join("bad.toml");
    write(
        &bad,
        "[[rules]]\nid = \"x\"\nbetween = [\"alpha.example\", \"nowhere.example\"]\naction = \"allow\"\n",
    )?;
    let (code, _, err) = ctl.run(&["policy", "diff", bad.to_str().context("path")?])?;
    ensure!(
        code == 1 && err.contains("not a declared domain"),
        "{code} {err}"
    );

    // Tokens: created (printed once), listed without the secret, used, revoked.
    let t = ctl.json(&["token", "create", "--name", "ci", "--role", "auditor"])?;
    let token = t["token"].as_str().context("token")?.to_string();
    let (code, out, _) = ctl.run(&["token", "list"])?;
    ensure!(
        code == 0 && out.contains("ci") && !out.contains(&token),
        "{out}"
    );
    let auditor_file = dir.path().join("auditor");
    write(&auditor_file, &token)?;
    let auditor = Ctl {
        api: node.api_url(),
        token_file: auditor_file,
    };
    let (code, _, err) = auditor.run(&["policy", "export"])?;
    ensure!(
        code == 3 && err.contains("auditor"),
        "an auditor exporting: {code} {err}"
    );
    ensure!(
        auditor.run(&["audit"])?.0 == 0,
        "an auditor reads the audit log"
    );
    let (code, _, _) = ctl.run(&["token", "revoke", t["id"].as_str().context("id")?])?;
    ensure!(code == 0);
    let (code, _, err) = auditor.run(&["audit"])?;
    ensure!(code == 4 && err.contains("revoked"), "{code} {err}");

    // The metadata log: the refused message is there, as an error; no content.
    let (code, out, err) = ctl.run(&["log", "tail", "--type", "error"])?;
    ensure!(
        code == 0 && out.contains("error") && out.contains("alice@alpha.example"),
        "{code} {out} {err}"
    );
    ensure!(
        !out.contains("after the apply"),
        "content in the log: {out}"
    );
    let csv = dir.path().join("log.csv");
    let (code, _, err) = ctl.run(&["log", "export", "--out", csv.to_str().context("path")?])?;
    ensure!(code == 0, "{err}");
    let text = std::fs::read_to_string(&csv)?;
    ensure!(
        text.starts_with("at_ms,") && text.lines().count() == 3,
        "two entries (one relayed, one refused): {text}"
    );
    // Usage is flushed about once a second.
    test_support::wait_for(
        "usage of what was sent",
        std::time::Duration::from_secs(10),
        || {
            let ctl = &ctl;
            async move {
                let u = ctl.json(&["usage", "report", "--months", "1"]).ok()?;
                (u["total"]["messages"] == 1 && u["total"]["errors"] == 1).then_some(())
            }
        },
    )
    .await?;
    let (code, out, _) = ctl.run(&["usage", "report", "--months", "1"])?;
    ensure!(
        code == 0
            && out.starts_with("MONTH")
            && out
                .lines()
                .nth(1)
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("1")),
        "{out}"
    );

    // No relay there: unavailable (5).
    let gone = Ctl {
        api: "http://127.0.0.1:9".into(),
        token_file: ctl.token_file.clone(),
    };
    ensure!(gone.run(&["whoami"])?.0 == 5);
    let (code, out, _) = ctl.run(&["approvals", "list"])?;
    ensure!(code == 0 && out.starts_with("ID"), "{out}");
    Ok(())
}
