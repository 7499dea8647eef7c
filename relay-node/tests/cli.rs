//! The relay-node command line.

use anyhow::{Result, ensure};
use std::process::Command;

fn relay_node() -> Result<Command> {
    Ok(Command::new(test_support::workspace_binary("relay-node")?))
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_problem_in_a_bad_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"
[store]
backend = "memory"
[[domains]]
name = "a.example"
platform = "http"
secret = "0123456789abcdef"
"#,
    )?;
    let out = relay_node()?.arg("check-config").arg(&good).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("ok (1 domains"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\nbackend = \"memory\"\nredis_ulr = \"x\"\n")?;
    let out = relay_node()?.arg("check-config").arg(&bad).output()?;
    ensure!(!out.status.success());
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("redis_ulr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Environment overrides are validated too.
    let out = relay_node()?
        .arg("check-config")
        .arg(&good)
        .env("FEDRELAY_HTTP__LISTEN", "0.0.0.0:8080")
        .output()?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("without TLS"));

    let out = relay_node()?.output()?;
    ensure!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--dev"));
    Ok(())
}

#[test]
fn check_config_skip_secret_files_validates_all_but_the_secret_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("pod.toml");
    let config = r#"
[store]
backend = "memory"
[[domains]]
name = "a.example"
platform = "http"
secret_file = "/nonexistent/fedrelay/secrets/a.example"
[teams]
app_id = "8f0e2c71-5d3a-4b7e-9f21-0c6d4e8a1b35"
app_tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47"
app_password_file = "/nonexistent/fedrelay/secrets/bot"
"#;
    std::fs::write(&cfg, config)?;
    // The files exist only where the node runs: reading them fails here…
    let out = relay_node()?.arg("check-config").arg(&cfg).output()?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/fedrelay/secrets"));
    // …and is what the flag skips.
    let out = relay_node()?
        .args(["check-config", "--skip-secret-files"])
        .arg(&cfg)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("secret files not read"));
    // Everything else is still checked.
    std::fs::write(&cfg, format!("{config}bot_nmae = \"x\"\n"))?;
    let out = relay_node()?
        .args(["check-config", "--skip-secret-files"])
        .arg(&cfg)
        .output()?;
    ensure!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bot_nmae"));
    Ok(())
}
