//! The Helm chart, `charts/fedrelay`: linted, rendered with its default values and every
//! `ci/*.yaml`, every rendered object validated against the Kubernetes API schemas, the
//! rendered `relay.toml` accepted by `relay-node check-config`, and what deployments rely on
//! checked in the manifests (locked-down pods, a grace period that covers the drain, probes,
//! no secret outside a Secret, alerts on metrics the relay exports, clear failures for bad values).
//!
//! Needs `helm` and `kubernetes-validate`: `tools/chart-tools` installs them into `.tools/`
//! (`tools/test` runs it); `CHART_TEST_HELM` and `CHART_TEST_KUBERNETES_VALIDATE` point elsewhere.

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RELEASE: &str = "rel";
const NAMESPACE: &str = "relay";
/// The chart's objects are checked against this Kubernetes version's API schemas.
const KUBERNETES_VERSION: &str = "1.31.0";
/// The Prometheus Operator's kinds, which the core schemas do not have: checked here instead.
const OPERATOR_KINDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/fedrelay")
}

fn tool(env: &str, installed: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => repo().join(".tools").join(installed),
    };
    ensure!(
        path.is_file(),
        "{} not found: run tools/chart-tools (tools/test does) to install helm and \
         kubernetes-validate into .tools/, or set {env} to the program",
        path.display()
    );
    Ok(path)
}

fn helm() -> Result<Command> {
    Ok(Command::new(tool("CHART_TEST_HELM", "bin/helm")?))
}

fn kubernetes_validate() -> Result<Command> {
    Ok(Command::new(tool(
        "CHART_TEST_KUBERNETES_VALIDATE",
        "venv/bin/kubernetes-validate",
    )?))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ci/*.yaml`, sorted.
fn ci_files() -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(chart().join("ci"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    ensure!(files.len() >= 4, "expected the chart's ci/*.yaml variants");
    Ok(files)
}

/// The default values, then each ci file: (name, values file).
fn cases() -> Result<Vec<(String, Option<PathBuf>)>> {
    let mut cases = vec![("default values".to_string(), None)];
    for f in ci_files()? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        cases.push((format!("ci/{name}"), Some(f)));
    }
    Ok(cases)
}

/// `helm template` with the given values file and `--set`s; the manifests, or helm's error.
fn template(values: Option<&Path>, sets: &[&str]) -> Result<std::result::Result<String, String>> {
    let mut cmd = helm()?;
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE]);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().context("running helm template")?;
    Ok(if out.status.success() {
        Ok(String::from_utf8(out.stdout)?)
    } else {
        Err(output_text(&out))
    })
}

fn render(name: &str, values: Option<&Path>) -> Result<Vec<Value>> {
    match template(values, &[])? {
        Ok(yaml) => documents(&yaml).with_context(|| format!("{name}: parsing the manifests")),
        Err(e) => bail!("{name}: helm template failed:\n{e}"),
    }
}

/// The YAML documents of a multi-document stream, empty ones left out.
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .with_context(|| format!("no {k} {n} rendered"))
}

fn fullname() -> String {
    format!("{RELEASE}-fedrelay")
}

fn relay_toml(docs: &[Value]) -> Result<String> {
    find(docs, "ConfigMap", &fullname())?["data"]["relay.toml"]
        .as_str()
        .map(str::to_owned)
        .context("the ConfigMap has no relay.toml")
}

fn relay_container(sts: &Value) -> Result<&Value> {
    sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "relay"))
        .context("the StatefulSet has no relay container")
}

/// The relay container's environment as the kubelet would give it to pod 0: field refs and
/// Secret refs filled in with stand-ins, `$(VAR)` references expanded.
fn pod_env(sts: &Value) -> Result<Vec<(String, String)>> {
    let pod = format!("{}-0", name(sts));
    let mut env: Vec<(String, String)> = Vec::new();
    for e in relay_container(sts)?["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let var = e["name"]
            .as_str()
            .context("env entry without name")?
            .to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            pod.clone()
        } else if e["valueFrom"]["secretKeyRef"].is_object() {
            "from-a-secret".to_string()
        } else {
            bail!("env {var}: a source this test does not know: {e}");
        };
        env.push((var, value));
    }
    Ok(env)
}

fn check_config(toml: &Path, env: &[(String, String)], skip_secret_files: bool) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay-node"));
    cmd.env_clear()
        .envs(env.iter().cloned())
        .arg("check-config");
    if skip_secret_files {
        cmd.arg("--skip-secret-files");
    }
    Ok(cmd.arg(toml).output()?)
}

fn toml_table(text: &str) -> Result<toml::Table> {
    Ok(toml::from_str(text)?)
}

fn toml_int(t: &toml::Table, section: &str, key: &str) -> Result<i64> {
    t.get(section)
        .and_then(|s| s.get(key))
        .and_then(toml::Value::as_integer)
        .with_context(|| format!("relay.toml has no integer {section}.{key}"))
}

fn listen_port(t: &toml::Table, section: &str) -> Result<i64> {
    let listen = t
        .get(section)
        .and_then(|s| s.get("listen"))
        .and_then(toml::Value::as_str)
        .with_context(|| format!("relay.toml has no {section}.listen"))?;
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("{section}.listen {listen} has no port"))
}

/// The files relay.toml names, as (`section.key`, path): every `*_file` key and every TLS file
/// (`tls_cert`, `tls_key`, `tls_ca`, `etcd_tls_*`), in tables, nested tables (`[api.oidc]`) and
/// arrays of tables.
fn named_files(t: &toml::Table) -> Vec<(String, String)> {
    fn visit(at: &str, table: &toml::Table, files: &mut Vec<(String, String)>) {
        for (k, v) in table {
            let here = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            match v {
                toml::Value::Table(inner) => visit(&here, inner, files),
                toml::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(inner) = item.as_table() {
                            visit(&format!("{here}[{i}]"), inner, files);
                        }
                    }
                }
                toml::Value::String(p)
                    if k.ends_with("_file")
                        || k.ends_with("tls_cert")
                        || k.ends_with("tls_key")
                        || k.ends_with("tls_ca") =>
                {
                    files.push((here, p.clone()));
                }
                _ => {}
            }
        }
    }
    let mut files = Vec::new();
    visit("", t, &mut files);
    files
}

/// The Secret and key that the container finds at `path`: the read-only volumeMount holding
/// it (the deepest), the pod's volume of that name, and the Secret item projected to that path.
fn mounted_secret(spec: &Value, container: &Value, path: &str) -> Result<(String, String)> {
    let (mount, rel) = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["subPath"].is_null())
        .filter_map(|m| {
            let dir = m["mountPath"].as_str()?;
            let rel = path.strip_prefix(dir)?.strip_prefix('/')?;
            Some((m, rel))
        })
        .max_by_key(|(m, _)| m["mountPath"].as_str().map_or(0, str::len))
        .with_context(|| format!("{path} is under no volumeMount of the container"))?;
    ensure!(
        mount["readOnly"] == true,
        "{path}: its volumeMount is not read-only"
    );
    let volume_name = mount["name"]
        .as_str()
        .context("a volumeMount without name")?;
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume_name)
        .with_context(|| format!("{path}: the pod has no volume {volume_name}"))?;
    let sources: Vec<(&Value, &Value)> = if volume["secret"].is_object() {
        vec![(&volume["secret"], &volume["secret"]["secretName"])]
    } else {
        volume["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["secret"].is_object())
            .map(|s| (&s["secret"], &s["secret"]["name"]))
            .collect()
    };
    for (secret, secret_name) in sources {
        for item in secret["items"].as_array().into_iter().flatten() {
            if item["path"] == rel {
                let secret_name = secret_name
                    .as_str()
                    .with_context(|| format!("{path}: a Secret source without a name"))?;
                let key = item["key"]
                    .as_str()
                    .with_context(|| format!("{path}: an item without a key"))?;
                return Ok((secret_name.to_string(), key.to_string()));
            }
        }
    }
    bail!("{path}: volume {volume_name} projects no Secret item to {rel}: {volume}")
}

/// The ports the relay pods' NetworkPolicy lets them reach, for rules limited by `to` peers
/// equal to `to`.
fn egress_ports_to(docs: &[Value], to: &Value) -> Result<BTreeSet<i64>> {
    let np = find(docs, "NetworkPolicy", &fullname())?;
    Ok(np["spec"]["egress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rule| &rule["to"] == to)
        .flat_map(|rule| rule["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["port"].as_i64())
        .collect())
}

/// The (port, protocol) pairs the relay pods' NetworkPolicy lets them reach, for rules limited
/// by `to` peers equal to `to`.
fn egress_port_protocols_to(docs: &[Value], to: &Value) -> Result<BTreeSet<(i64, String)>> {
    let np = find(docs, "NetworkPolicy", &fullname())?;
    Ok(np["spec"]["egress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rule| &rule["to"] == to)
        .flat_map(|rule| rule["ports"].as_array().into_iter().flatten())
        .filter_map(|p| Some((p["port"].as_i64()?, p["protocol"].as_str()?.to_string())))
        .collect())
}

/// The SIP transports, their relay.toml keys and Kubernetes protocols.
const SIP_TRANSPORTS: [(&str, &str); 3] = [("udp", "UDP"), ("tcp", "TCP"), ("tls", "TCP")];

/// What the chart renders for the SIP edge: the `sip-*` container ports and the `-sip`
/// Service's ports, each as (name, port, protocol), and the relay pods' NetworkPolicy ingress
/// rule that admits to those container ports.
struct SipRendering<'a> {
    container_ports: BTreeSet<(String, i64, String)>,
    service: Option<&'a Value>,
    service_ports: BTreeSet<(String, i64, String)>,
    ingress_rule: Option<&'a Value>,
}

fn sip_rendering(docs: &[Value]) -> Result<SipRendering<'_>> {
    let sts = find(docs, "StatefulSet", &fullname())?;
    let triple = |p: &Value, port: &str| -> Option<(String, i64, String)> {
        Some((
            p["name"].as_str()?.to_string(),
            p[port].as_i64()?,
            p["protocol"].as_str()?.to_string(),
        ))
    };
    let container_ports: BTreeSet<(String, i64, String)> = relay_container(sts)?["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("sip")))
        .filter_map(|p| triple(p, "containerPort"))
        .collect();
    let service = docs
        .iter()
        .find(|d| kind(d) == "Service" && name(d) == format!("{}-sip", fullname()));
    let mut service_ports = BTreeSet::new();
    if let Some(svc) = service {
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            ensure!(
                p["targetPort"] == p["name"],
                "the SIP Service's port {p} does not target the container port of its name"
            );
            service_ports.extend(triple(p, "port"));
        }
    }
    let ingress_rule = docs
        .iter()
        .find(|d| kind(d) == "NetworkPolicy" && name(d) == fullname())
        .and_then(|np| {
            np["spec"]["ingress"].as_array()?.iter().find(|r| {
                r["ports"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        container_ports
                            .iter()
                            .any(|(_, port, pr)| p["port"] == *port && p["protocol"] == pr.as_str())
                    })
                })
            })
        });
    Ok(SipRendering {
        container_ports,
        service,
        service_ports,
        ingress_rule,
    })
}

#[test]
fn helm_lint_passes_with_the_default_values_and_every_ci_file() -> Result<()> {
    for (case, values) in cases()? {
        let mut cmd = helm()?;
        cmd.args(["lint", "--strict"]).arg(chart());
        if let Some(v) = &values {
            cmd.arg("--values").arg(v);
        }
        let out = cmd.output().context("running helm lint")?;
        ensure!(
            out.status.success(),
            "helm lint --strict, {case}:\n{}",
            output_text(&out)
        );
    }
    Ok(())
}

/// Every object of every case against the Kubernetes API schemas (strict: unknown fields are
/// errors); the Prometheus Operator's objects, which those schemas do not cover, field by field.
#[test]
fn rendered_objects_validate_against_the_kubernetes_api_schemas() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    let mut core_objects = 0;
    let mut operator_objects = 0;
    let metrics = exported_metric_names()?;
    for (i, (case, values)) in cases()?.into_iter().enumerate() {
        let yaml = match template(values.as_deref(), &[])? {
            Ok(yaml) => yaml,
            Err(e) => bail!("{case}: helm template failed:\n{e}"),
        };
        let docs = documents(&yaml)?;
        // helm's own text goes to the validator, which reads YAML as Kubernetes does.
        let mut core = Vec::new();
        for text in yaml.split("\n---\n") {
            let Some(doc) = documents(text)?.pop() else {
                continue;
            };
            if OPERATOR_KINDS.contains(&kind(&doc)) {
                check_operator_object(&case, &doc, &docs, &metrics)?;
                operator_objects += 1;
            } else {
                core.push(text);
            }
        }
        ensure!(
            core.len() + operator_objects_in(&docs) == docs.len(),
            "{case}: splitting the manifests lost objects"
        );
        core_objects += core.len();
        let file = dir.path().join(format!("case-{i}.yaml"));
        std::fs::write(&file, core.join("\n---\n"))?;
        files.push((case, file));
    }
    ensure!(
        operator_objects >= 2,
        "no ci file renders the ServiceMonitor and the PrometheusRule"
    );

    let out = kubernetes_validate()?
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files.iter().map(|(_, f)| f))
        .output()
        .context("running kubernetes-validate")?;
    let text = output_text(&out);
    let named = || {
        let mut t = text.clone();
        for (case, f) in &files {
            t = t.replace(&f.display().to_string(), case);
        }
        t
    };
    ensure!(
        out.status.success(),
        "kubernetes-validate failed:\n{}",
        named()
    );
    // A kind without a schema is only a warning to kubernetes-validate: not here.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        problems.is_empty(),
        "kubernetes-validate did not pass everything:\n{}",
        named()
    );
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    ensure!(
        passed == core_objects,
        "{passed} objects passed validation, {core_objects} were rendered:\n{}",
        named()
    );
    Ok(())
}

fn operator_objects_in(docs: &[Value]) -> usize {
    docs.iter()
        .filter(|d| OPERATOR_KINDS.contains(&kind(d)))
        .count()
}

/// The metric names the relay registers: every `"fedrelay_…"` literal in its sources.
fn exported_metric_names() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut dirs: Vec<PathBuf> = ["relay-node/src", "cluster/src", "session-actor/src"]
        .iter()
        .map(|d| repo().join(d))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for (i, _) in text.match_indices("\"fedrelay_") {
                    let rest = &text[i + 1..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                        .unwrap_or(rest.len());
                    if rest[end..].starts_with('"') {
                        names.insert(rest[..end].to_string());
                    }
                }
            }
        }
    }
    ensure!(
        names.contains("fedrelay_messages_in_total") && names.len() > 20,
        "found too few metric names in the sources: {names:?}"
    );
    Ok(names)
}

/// `fedrelay_…` names used in a PromQL text, each resolved to a metric the relay exports
/// (histograms as `_bucket`, `_sum`, `_count`).
fn check_metric_references(what: &str, text: &str, metrics: &BTreeSet<String>) -> Result<usize> {
    let mut used = 0;
    for (i, _) in text.match_indices("fedrelay_") {
        if i > 0 && text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| metrics.contains(*b)))
            .unwrap_or(name);
        ensure!(
            metrics.contains(base),
            "{what} uses {name}, which the relay does not export"
        );
        used += 1;
    }
    Ok(used)
}

fn check_operator_object(
    case: &str,
    doc: &Value,
    docs: &[Value],
    metrics: &BTreeSet<String>,
) -> Result<()> {
    let what = format!("{case}: {} {}", kind(doc), name(doc));
    ensure!(
        doc["apiVersion"] == "monitoring.coreos.com/v1",
        "{what}: apiVersion {}",
        doc["apiVersion"]
    );
    ensure!(!name(doc).is_empty(), "{what}: no metadata.name");
    let fields: BTreeSet<&str> = doc
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    ensure!(
        fields == BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]),
        "{what}: top-level fields {fields:?}"
    );
    if kind(doc) == "ServiceMonitor" {
        let selector = doc["spec"]["selector"]["matchLabels"]
            .as_object()
            .context("ServiceMonitor without spec.selector.matchLabels")?;
        let endpoints = doc["spec"]["endpoints"]
            .as_array()
            .filter(|e| !e.is_empty())
            .context("ServiceMonitor without spec.endpoints")?;
        // It must select the admin Service, and name a port that Service has.
        let services: Vec<&Value> = docs
            .iter()
            .filter(|d| kind(d) == "Service")
            .filter(|d| {
                selector
                    .iter()
                    .all(|(k, v)| &d["metadata"]["labels"][k.as_str()] == v)
            })
            .collect();
        ensure!(
            services.len() == 1 && name(services[0]) == format!("{}-admin", fullname()),
            "{what}: selects {:?}, not just the admin Service",
            services.iter().map(|s| name(s)).collect::<Vec<_>>()
        );
        for e in endpoints {
            let port = e["port"].as_str().context("endpoint without a port name")?;
            ensure!(
                services[0]["spec"]["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == port)),
                "{what}: port {port} is not a port of the admin Service"
            );
            ensure!(e["path"] == "/metrics", "{what}: path {}", e["path"]);
        }
    } else {
        let groups = doc["spec"]["groups"]
            .as_array()
            .filter(|g| !g.is_empty())
            .context("PrometheusRule without spec.groups")?;
        let mut alerts = 0;
        for g in groups {
            ensure!(g["name"].is_string(), "{what}: a group without name");
            for r in g["rules"].as_array().into_iter().flatten() {
                let alert = r["alert"].as_str().context("a rule without alert")?;
                let expr = r["expr"].as_str().context("a rule without expr")?;
                ensure!(
                    r["labels"]["severity"].is_string()
                        && r["annotations"]["summary"].is_string()
                        && r["annotations"]["description"].is_string(),
                    "{what}: {alert} needs a severity, a summary and a description"
                );
                ensure!(
                    expr.contains(&format!("namespace=\"{NAMESPACE}\"")),
                    "{what}: {alert} is not scoped to the release's namespace"
                );
                if !expr.contains("fedrelay_") {
                    ensure!(expr.starts_with("up{"), "{what}: {alert}: {expr}");
                }
                check_metric_references(&format!("{what}: {alert}"), expr, metrics)?;
                alerts += 1;
            }
        }
        ensure!(alerts >= 8, "{what}: only {alerts} alerts");
    }
    Ok(())
}

#[test]
fn the_grafana_dashboard_shows_metrics_the_relay_exports() -> Result<()> {
    let metrics = exported_metric_names()?;
    let docs = render(
        "ci/production-external.yaml",
        Some(&chart().join("ci/production-external.yaml")),
    )?;
    let cm = find(&docs, "ConfigMap", &format!("{}-dashboard", fullname()))?;
    ensure!(
        cm["metadata"]["labels"]["grafana_dashboard"] == "1",
        "the dashboard ConfigMap lacks the grafana_dashboard label"
    );
    let dashboard: Value = serde_json::from_str(
        cm["data"]["fedrelay.json"]
            .as_str()
            .context("no fedrelay.json in the dashboard ConfigMap")?,
    )?;
    let mut used = BTreeSet::new();
    let mut panels = 0;
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("a target without expr")?;
            let title = p["title"].as_str().unwrap_or("?");
            ensure!(
                check_metric_references(&format!("dashboard panel {title}"), expr, &metrics)? > 0,
                "dashboard panel {title}: {expr} uses no relay metric"
            );
            for (i, _) in expr.match_indices("fedrelay_") {
                let rest = &expr[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                used.insert(rest[..end].trim_end_matches("_bucket").to_string());
            }
        }
        panels += 1;
    }
    ensure!(panels >= 10, "only {panels} panels");
    // Every metric the relay exports is on the dashboard.
    let missing: Vec<&String> = metrics.iter().filter(|m| !used.contains(*m)).collect();
    ensure!(missing.is_empty(), "not on the dashboard: {missing:?}");
    Ok(())
}

/// The ConfigMap's relay.toml, with the environment a pod gets, passes `relay-node
/// check-config` in every case; a broken one does not.
#[test]
fn the_rendered_relay_toml_passes_check_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (i, (case, values)) in cases()?.into_iter().enumerate() {
        let docs = render(&case, values.as_deref())?;
        let toml = relay_toml(&docs)?;
        let env = pod_env(find(&docs, "StatefulSet", &fullname())?)?;
        let file = dir.path().join(format!("relay-{i}.toml"));
        std::fs::write(&file, &toml)?;
        let out = check_config(&file, &env, true)?;
        ensure!(
            out.status.success() && output_text(&out).contains(": ok ("),
            "{case}: relay-node check-config refuses the rendered relay.toml:\n{}\n{toml}",
            output_text(&out)
        );
        // Without the flag, check-config reads the domains' secret files, the bot's password
        // file and the management API's bootstrap token (not TLS material or the XMPP
        // dialback secret).
        let table = toml_table(&toml)?;
        let uses_secret_files = table
            .get("domains")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .any(|d| d.get("secret_file").is_some())
            || table
                .get("teams")
                .is_some_and(|t| t.get("app_password_file").is_some())
            || table
                .get("api")
                .is_some_and(|a| a.get("bootstrap_token_file").is_some());
        let out = check_config(&file, &env, false)?;
        if uses_secret_files {
            // The secret files exist only in the pod: reading them is what the flag skips.
            ensure!(
                !out.status.success(),
                "{case}: check-config read secret files that do not exist here"
            );
        } else {
            ensure!(
                out.status.success(),
                "{case}: without secret files, check-config must pass as it is:\n{}",
                output_text(&out)
            );
        }
        if case == "default values" {
            ensure!(!uses_secret_files, "the default values declare domains");
        }

        // The check can fail: an unknown key, and a bad value in an environment override.
        let broken = dir.path().join(format!("broken-{i}.toml"));
        std::fs::write(&broken, format!("unknown_key = 1\n{toml}"))?;
        let out = check_config(&broken, &env, true)?;
        ensure!(
            !out.status.success() && output_text(&out).contains("unknown_key"),
            "{case}: a config with an unknown key passed check-config:\n{}",
            output_text(&out)
        );
        let mut bad_env = env.clone();
        bad_env.push(("FEDRELAY_ADMIN__LISTEN".into(), "not-an-address".into()));
        let out = check_config(&file, &bad_env, true)?;
        ensure!(
            !out.status.success(),
            "{case}: a bad environment override passed check-config"
        );
    }
    Ok(())
}

/// Every file relay.toml names (secrets, TLS certificates and keys) is in a Secret that the
/// relay container mounts read-only, in every case.
#[test]
fn every_file_relay_toml_names_is_mounted_from_a_secret() -> Result<()> {
    let mut named = 0;
    for (case, values) in cases()? {
        let docs = render(&case, values.as_deref())?;
        let toml = toml_table(&relay_toml(&docs)?)?;
        let sts = find(&docs, "StatefulSet", &fullname())?;
        let spec = &sts["spec"]["template"]["spec"];
        let relay = relay_container(sts)?;
        for (key, path) in named_files(&toml) {
            mounted_secret(spec, relay, &path).with_context(|| format!("{case}: {key}"))?;
            named += 1;
        }
    }
    ensure!(named >= 10, "only {named} files named in all the cases");
    Ok(())
}

/// The production variant reaches Redis (rediss://, with the password) and etcd (https://)
/// over TLS with client certificates: relay.toml names the CA, certificate and key, mounted
/// from the Secrets and keys the values give; `check-config` accepts it and reads those keys;
/// the NetworkPolicy lets the pods reach the URLs' ports; the loadtest Job, which talks to
/// neither, does not get the client keys.
#[test]
fn the_production_variant_speaks_tls_to_redis_and_etcd() -> Result<()> {
    let values_file = chart().join("ci/production-external.yaml");
    let values: Value = serde_norway::from_str(&std::fs::read_to_string(&values_file)?)?;
    let defaults: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    let docs = render("ci/production-external.yaml", Some(&values_file))?;
    let text = relay_toml(&docs)?;
    let toml = toml_table(&text)?;
    let sts = find(&docs, "StatefulSet", &fullname())?;
    let spec = &sts["spec"]["template"]["spec"];
    let relay = relay_container(sts)?;
    let env = pod_env(sts)?;
    let get = |section: &str, key: &str| {
        toml.get(section)
            .and_then(|s| s.get(key))
            .with_context(|| format!("relay.toml has no {section}.{key}"))
    };

    ensure!(
        get("store", "redis_url")?
            .as_str()
            .is_some_and(|u| u.starts_with("rediss://")),
        "store.redis_url is not rediss://"
    );
    let url = env
        .iter()
        .find(|(k, _)| k == "FEDRELAY_STORE__REDIS_URL")
        .map(|(_, v)| v.as_str());
    ensure!(
        url.is_some_and(|u| u.starts_with("rediss://fedrelay:from-a-secret@")),
        "the pod's Redis URL with the password is {url:?}"
    );
    let endpoints = get("cluster", "etcd_endpoints")?
        .as_array()
        .context("cluster.etcd_endpoints is not a list")?;
    ensure!(
        !endpoints.is_empty()
            && endpoints
                .iter()
                .all(|e| e.as_str().is_some_and(|e| e.starts_with("https://"))),
        "cluster.etcd_endpoints are not all https://: {endpoints:?}"
    );

    for (section, key, backend, value) in [
        ("store", "tls_ca", "externalRedis", "caKey"),
        ("store", "tls_cert", "externalRedis", "certKey"),
        ("store", "tls_key", "externalRedis", "keyKey"),
        ("cluster", "etcd_tls_ca", "externalEtcd", "caKey"),
        ("cluster", "etcd_tls_cert", "externalEtcd", "certKey"),
        ("cluster", "etcd_tls_key", "externalEtcd", "keyKey"),
    ] {
        let path = get(section, key)?
            .as_str()
            .with_context(|| format!("{section}.{key} is not a path"))?;
        let tls = &values[backend]["tls"];
        let want_secret = tls["existingSecret"]
            .as_str()
            .with_context(|| format!("the ci file has no {backend}.tls.existingSecret"))?;
        let want_key = tls[value]
            .as_str()
            .or_else(|| defaults[backend]["tls"][value].as_str())
            .with_context(|| format!("no {backend}.tls.{value}"))?;
        let (secret, secret_key) =
            mounted_secret(spec, relay, path).with_context(|| format!("{section}.{key}"))?;
        ensure!(
            secret == want_secret && secret_key == want_key,
            "{section}.{key} = {path} is {secret}/{secret_key} in the pod, \
             not {backend}.tls ({want_secret}/{want_key})"
        );
    }

    // The loadtest Job plays the HTTP edge only: no Redis or etcd client keys there.
    let job = docs
        .iter()
        .find(|d| kind(d) == "Job")
        .context("no loadtest Job rendered")?;
    let job_volumes = job["spec"]["template"]["spec"]["volumes"].to_string();
    for backend in ["externalRedis", "externalEtcd"] {
        let secret = values[backend]["tls"]["existingSecret"].to_string();
        ensure!(
            !job_volumes.contains(&secret),
            "the loadtest Job mounts {secret}: {job_volumes}"
        );
    }

    // check-config accepts it, and does read the TLS keys: with a plain redis:// URL (the
    // environment override) or https:// etcd without its CA, it refuses the same file.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &text)?;
    let out = check_config(&file, &env, true)?;
    ensure!(
        out.status.success() && output_text(&out).contains(": ok ("),
        "relay-node check-config refuses the TLS variant:\n{}\n{text}",
        output_text(&out)
    );
    let mut plain = env.clone();
    plain.retain(|(k, _)| k != "FEDRELAY_STORE__REDIS_URL");
    plain.push((
        "FEDRELAY_STORE__REDIS_URL".into(),
        "redis://redis-master.data.svc:6379/0".into(),
    ));
    let out = check_config(&file, &plain, true)?;
    ensure!(
        !out.status.success() && output_text(&out).contains("rediss://"),
        "check-config took Redis TLS files with a redis:// URL:\n{}",
        output_text(&out)
    );
    let no_ca = dir.path().join("no-etcd-ca.toml");
    let without: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("etcd_tls_ca"))
        .collect();
    std::fs::write(&no_ca, without.join("\n"))?;
    let out = check_config(&no_ca, &env, true)?;
    ensure!(
        !out.status.success() && output_text(&out).contains("etcd_tls_ca"),
        "check-config took https:// etcd endpoints without etcd_tls_ca:\n{}",
        output_text(&out)
    );

    // NetworkPolicy egress to the ports of the rediss:// and https:// URLs: given, or Redis's
    // default 6379 when the URL has none.
    let redis_to = &values["networkPolicy"]["egress"]["redisTo"];
    let etcd_to = &values["networkPolicy"]["egress"]["etcdTo"];
    ensure!(
        redis_to.is_array() && etcd_to.is_array(),
        "no redisTo/etcdTo"
    );
    let ports = egress_ports_to(&docs, redis_to)?;
    ensure!(
        ports.contains(&6380),
        "no egress to Redis on 6380: {ports:?}"
    );
    let ports = egress_ports_to(&docs, etcd_to)?;
    ensure!(
        ports.contains(&2379),
        "no egress to etcd on 2379: {ports:?}"
    );
    let yaml = template(
        Some(&values_file),
        &[
            "externalRedis.url=rediss://redis-master.data.svc/0",
            "externalEtcd.endpoints={https://etcd-0.etcd.data.svc:12379,https://etcd-1.etcd.data.svc:12379}",
        ],
    )?
    .map_err(|e| anyhow::anyhow!("other ports did not render:\n{e}"))?;
    let other = documents(&yaml)?;
    let redis_ports = egress_ports_to(&other, redis_to)?;
    let etcd_ports = egress_ports_to(&other, etcd_to)?;
    ensure!(
        redis_ports.contains(&6379) && etcd_ports.contains(&12379),
        "egress ports {redis_ports:?} / {etcd_ports:?} for rediss://…/0 and https://…:12379"
    );
    ensure!(
        !redis_ports.contains(&6380) && !etcd_ports.contains(&2379),
        "egress to ports no URL names: {redis_ports:?} / {etcd_ports:?}"
    );
    Ok(())
}

/// The XMPP variant (`ci/xmpp.yaml`) runs the edge: relay.toml's `[xmpp]` listens on the
/// container port that the `-xmpp` Service targets; its certificate, key, peers' CA and dialback
/// secret are files mounted read-only from the Secrets and keys the values give; it carries the
/// limits that are set (only those), the peers and their authentication; `check-config` accepts
/// it; the NetworkPolicy lets peers in and the pods out to the peers' ports. The same values
/// with the edge off fail to render, because of their XMPP domains.
#[test]
fn the_xmpp_variant_runs_the_edge_with_its_secrets_mounted() -> Result<()> {
    let values_file = chart().join("ci/xmpp.yaml");
    let values: Value = serde_norway::from_str(&std::fs::read_to_string(&values_file)?)?;
    let defaults: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    let x = &values["xmpp"];
    let default = |path: &[&str]| {
        let mut v = &defaults["xmpp"];
        for p in path {
            v = &v[*p];
        }
        v.clone()
    };
    let docs = render("ci/xmpp.yaml", Some(&values_file))?;
    let text = relay_toml(&docs)?;
    let toml = toml_table(&text)?;
    let xmpp = toml
        .get("xmpp")
        .and_then(toml::Value::as_table)
        .context("relay.toml has no [xmpp]")?;
    let sts = find(&docs, "StatefulSet", &fullname())?;
    let spec = &sts["spec"]["template"]["spec"];
    let relay = relay_container(sts)?;
    let string = |k: &str| {
        xmpp.get(k)
            .and_then(toml::Value::as_str)
            .with_context(|| format!("relay.toml has no string xmpp.{k}"))
    };

    // The listener, on the standard port, which the container and the Service expose.
    ensure!(
        x["port"].is_null() && default(&["port"]) == 5269,
        "the ci file should keep the default port"
    );
    ensure!(
        string("listen")? == "0.0.0.0:5269",
        "xmpp.listen is {}",
        string("listen")?
    );
    let container_port = relay["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "xmpp-server")
        .context("the relay container has no xmpp-server port")?;
    ensure!(
        container_port["containerPort"] == 5269 && container_port["protocol"] == "TCP",
        "the xmpp-server port is {container_port}"
    );
    let svc = find(&docs, "Service", &format!("{}-xmpp", fullname()))?;
    let svc_port = &svc["spec"]["ports"][0];
    ensure!(
        svc["spec"]["type"] == "LoadBalancer"
            && svc_port["port"] == 5269
            && svc_port["targetPort"] == "xmpp-server"
            && svc_port["protocol"] == "TCP"
            && svc["spec"]["publishNotReadyAddresses"].is_null(),
        "the XMPP Service is {}",
        svc["spec"]
    );
    ensure!(
        svc["metadata"]["annotations"] == x["service"]["annotations"],
        "the XMPP Service's annotations are {}",
        svc["metadata"]["annotations"]
    );

    // Certificate, key, peers' CA and dialback secret: files from the values' Secrets and keys.
    let tls_secret = x["tls"]["secretName"].clone();
    let ca_key = match &x["tls"]["caKey"] {
        Value::Null => default(&["tls", "caKey"]),
        k => k.clone(),
    };
    let dialback_key = match &x["dialbackSecret"]["key"] {
        Value::Null => default(&["dialbackSecret", "key"]),
        k => k.clone(),
    };
    for (key, secret, secret_key) in [
        ("tls_cert", &tls_secret, &Value::from("tls.crt")),
        ("tls_key", &tls_secret, &Value::from("tls.key")),
        ("tls_ca", &x["tls"]["caSecretName"], &ca_key),
        (
            "dialback_secret_file",
            &x["dialbackSecret"]["secretName"],
            &dialback_key,
        ),
    ] {
        let (want_secret, want_key) = secret
            .as_str()
            .zip(secret_key.as_str())
            .with_context(|| format!("the ci file gives no Secret for xmpp.{key}"))?;
        let path = string(key)?;
        let (got_secret, got_key) =
            mounted_secret(spec, relay, path).with_context(|| format!("xmpp.{key}"))?;
        ensure!(
            got_secret == want_secret && got_key == want_key,
            "xmpp.{key} = {path} is {got_secret}/{got_key} in the pod, not {want_secret}/{want_key}"
        );
    }
    ensure!(
        xmpp.get("dialback_secret").is_none(),
        "an inline dialback secret in the ConfigMap"
    );

    // The settings given, and no limit that was not; STARTTLS stays required.
    ensure!(
        xmpp.get("default_auth").and_then(toml::Value::as_str) == x["defaultAuth"].as_str(),
        "xmpp.default_auth is {:?}",
        xmpp.get("default_auth")
    );
    let mut set = 0;
    for (value, key) in [
        ("maxStanzaBytes", "max_stanza_bytes"),
        ("maxDepth", "max_depth"),
        ("handshakeTimeoutSecs", "handshake_timeout_secs"),
        ("idleTimeoutSecs", "idle_timeout_secs"),
        ("connectTimeoutSecs", "connect_timeout_secs"),
        ("ackTimeoutSecs", "ack_timeout_secs"),
    ] {
        ensure!(default(&[value]).is_null(), "values.yaml sets xmpp.{value}");
        let got = xmpp.get(key).map(|v| v.as_integer());
        ensure!(
            got == x[value].as_i64().map(Some),
            "xmpp.{key} is {got:?}, the values give {}",
            x[value]
        );
        set += usize::from(got.is_some());
    }
    ensure!(
        (1..6).contains(&set),
        "the ci file should set some limits and leave others"
    );
    ensure!(
        xmpp.get("require_tls").is_none() && xmpp.get("dns_server").is_none(),
        "[xmpp] has keys no value asked for: {xmpp:?}"
    );
    let peers: Vec<(Option<&str>, Option<&str>, Option<&str>)> = xmpp
        .get("peers")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |k: &str| p.get(k).and_then(toml::Value::as_str);
            (s("domain"), s("address"), s("auth"))
        })
        .collect();
    let want: Vec<(Option<&str>, Option<&str>, Option<&str>)> = x["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["domain"].as_str(),
                p["address"].as_str(),
                p["auth"].as_str(),
            )
        })
        .collect();
    ensure!(
        !want.is_empty() && peers == want,
        "[[xmpp.peers]] {peers:?}, the values give {want:?}"
    );
    // An XMPP domain is a name and a platform: no secret, delivery or tenant.
    let xmpp_domains: Vec<&toml::Value> = toml
        .get("domains")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| d.get("platform").and_then(toml::Value::as_str) == Some("xmpp"))
        .collect();
    ensure!(
        xmpp_domains.len() == want.len()
            && xmpp_domains
                .iter()
                .all(|d| d.as_table().is_some_and(|t| t.len() == 2)),
        "the XMPP domains in relay.toml: {xmpp_domains:?}"
    );

    // check-config accepts it, and does check the edge: without [xmpp] the same file is refused.
    let env = pod_env(sts)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &text)?;
    let out = check_config(&file, &env, true)?;
    ensure!(
        out.status.success() && output_text(&out).contains(": ok ("),
        "relay-node check-config refuses the XMPP variant:\n{}\n{text}",
        output_text(&out)
    );
    let without: Vec<&str> = text
        .split("\n\n")
        .filter(|block| !block.starts_with("[xmpp]") && !block.starts_with("[[xmpp.peers]]"))
        .collect();
    ensure!(without.len() + 1 + want.len() == text.split("\n\n").count());
    let no_edge = dir.path().join("no-edge.toml");
    std::fs::write(&no_edge, without.join("\n\n"))?;
    let out = check_config(&no_edge, &env, true)?;
    ensure!(
        !out.status.success() && output_text(&out).contains("no [xmpp] section"),
        "check-config took XMPP domains without [xmpp]:\n{}",
        output_text(&out)
    );

    // NetworkPolicy: peers in on 5269 from anywhere (networkPolicy.xmppFrom is empty); out to
    // networkPolicy.egress.xmppPorts and the port of every xmpp.peers[].address.
    let np = find(&docs, "NetworkPolicy", &fullname())?;
    let rule = np["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["ports"][0]["port"] == 5269)
        .context("no NetworkPolicy ingress rule for the XMPP edge")?;
    ensure!(
        rule["from"].is_null() && rule["ports"].as_array().is_some_and(|p| p.len() == 1),
        "the XMPP ingress rule is {rule}"
    );
    let ports = egress_ports_to(&docs, &Value::Null)?;
    let mut want_ports: BTreeSet<i64> = values["networkPolicy"]["egress"]["xmppPorts"]
        .as_array()
        .context("the ci file has no networkPolicy.egress.xmppPorts")?
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    for p in &want {
        if let Some(port) = p.1.and_then(|a| a.rsplit_once(':')?.1.parse().ok()) {
            want_ports.insert(port);
        }
    }
    ensure!(
        want_ports.len() >= 3 && want_ports.is_subset(&ports),
        "egress to XMPP peers on {ports:?}, not all of {want_ports:?}"
    );

    // The same values with the edge off: refused, naming the XMPP domains.
    match template(Some(&values_file), &["xmpp.enabled=false"])? {
        Ok(_) => bail!("XMPP domains rendered with xmpp.enabled=false"),
        Err(e) => ensure!(
            e.contains("jabber.partner.example") && e.contains("xmpp.enabled=true"),
            "{e}"
        ),
    }
    Ok(())
}

/// The SIP variant (`ci/sip.yaml`) runs the edge: relay.toml's `[sip]` listens on the enabled
/// transports' container ports, which the `-sip` Service exposes on the same ports and
/// protocols (Via and Contact name them), keeping peers' source addresses; `host` is the public
/// name; the certificate, key, peers' CA and the digest passwords are files mounted read-only
/// from the Secrets and keys the values give; it carries the limits that are set (only those)
/// and the peers as given; `check-config` accepts it; the NetworkPolicy lets `sipFrom` in on
/// those ports and the pods out to `sipPorts` and the peers' ports over their transports. The
/// same values with the edge off fail to render, because of their SIP domains.
#[test]
fn the_sip_variant_runs_the_edge_with_its_secrets_mounted() -> Result<()> {
    let values_file = chart().join("ci/sip.yaml");
    let values: Value = serde_norway::from_str(&std::fs::read_to_string(&values_file)?)?;
    let defaults: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    let x = &values["sip"];
    let default = |path: &[&str]| {
        let mut v = &defaults["sip"];
        for p in path {
            v = &v[*p];
        }
        v.clone()
    };
    let value = |path: &[&str]| {
        let mut v = x;
        for p in path {
            v = &v[*p];
        }
        if v.is_null() {
            default(path)
        } else {
            v.clone()
        }
    };
    let docs = render("ci/sip.yaml", Some(&values_file))?;
    let text = relay_toml(&docs)?;
    let toml = toml_table(&text)?;
    let sip = toml
        .get("sip")
        .and_then(toml::Value::as_table)
        .context("relay.toml has no [sip]")?;
    let sts = find(&docs, "StatefulSet", &fullname())?;
    let spec = &sts["spec"]["template"]["spec"];
    let relay = relay_container(sts)?;
    let string = |k: &str| {
        sip.get(k)
            .and_then(toml::Value::as_str)
            .with_context(|| format!("relay.toml has no string sip.{k}"))
    };

    // The defaults: TLS on 5061 only, as Skype for Business federates.
    ensure!(
        default(&["enabled"]) == false
            && default(&["tls", "enabled"]) == true
            && default(&["tls", "port"]) == 5061
            && default(&["udp", "enabled"]) == false
            && default(&["udp", "port"]) == 5060
            && default(&["tcp", "enabled"]) == false
            && default(&["tcp", "port"]) == 5060
            && default(&["service", "externalTrafficPolicy"]) == "Local"
            && defaults["networkPolicy"]["egress"]["sipPorts"] == serde_json::json!([5060, 5061]),
        "values.yaml's SIP defaults changed: {}",
        defaults["sip"]
    );

    // The listeners: the enabled transports on their ports, the others off; the container and
    // the Service expose them, on the same port numbers and protocols.
    let mut want_ports = BTreeSet::new();
    let mut enabled = 0;
    for (t, protocol) in SIP_TRANSPORTS {
        if value(&[t, "enabled"]) == true {
            let port = value(&[t, "port"])
                .as_i64()
                .with_context(|| format!("no sip.{t}.port"))?;
            ensure!(
                string(t)? == format!("0.0.0.0:{port}"),
                "sip.{t} is {}",
                string(t)?
            );
            want_ports.insert((format!("sip-{t}"), port, protocol.to_string()));
            enabled += 1;
        } else {
            ensure!(sip.get(t).is_none(), "sip.{t} listens, but it is off");
        }
    }
    ensure!(
        (2..3).contains(&enabled),
        "the ci file should turn on two transports"
    );
    let r = sip_rendering(&docs)?;
    ensure!(
        r.container_ports == want_ports,
        "the relay container's SIP ports are {:?}, not {want_ports:?}",
        r.container_ports
    );
    ensure!(
        r.service_ports == want_ports,
        "the SIP Service's ports are {:?}, not {want_ports:?}",
        r.service_ports
    );
    let svc = r.service.context("no SIP Service")?;
    ensure!(
        svc["spec"]["type"] == "LoadBalancer"
            && svc["spec"]["externalTrafficPolicy"] == "Local"
            && svc["spec"]["publishNotReadyAddresses"].is_null(),
        "the SIP Service is {}",
        svc["spec"]
    );
    ensure!(
        svc["metadata"]["annotations"] == x["service"]["annotations"],
        "the SIP Service's annotations are {}",
        svc["metadata"]["annotations"]
    );
    ensure!(
        Some(string("host")?) == x["host"].as_str(),
        "sip.host is {}",
        string("host")?
    );

    // Certificate, key, peers' CA and digest passwords: files from the values' Secrets and keys.
    let tls_secret = value(&["tls", "secretName"]);
    let mut files = vec![
        (
            "sip.tls_cert".to_string(),
            string("tls_cert")?.to_string(),
            tls_secret.clone(),
            Value::from("tls.crt"),
        ),
        (
            "sip.tls_key".to_string(),
            string("tls_key")?.to_string(),
            tls_secret.clone(),
            Value::from("tls.key"),
        ),
        (
            "sip.tls_ca".to_string(),
            string("tls_ca")?.to_string(),
            value(&["tls", "caSecretName"]),
            value(&["tls", "caKey"]),
        ),
    ];
    let peers: Vec<&toml::Value> = sip
        .get("peers")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let want_peers = x["peers"]
        .as_array()
        .context("the ci file has no sip.peers")?;
    ensure!(
        peers.len() == want_peers.len() && want_peers.len() >= 2,
        "[[sip.peers]] {peers:?}, the values give {want_peers:?}"
    );
    let mut with_password = 0;
    for (got, want) in peers.iter().zip(want_peers) {
        let domain = want["domain"].as_str().context("a peer without domain")?;
        let s = |k: &str| got.get(k).and_then(toml::Value::as_str);
        ensure!(
            s("domain") == Some(domain)
                && s("address") == want["address"].as_str()
                && s("transport") == Some(want["transport"].as_str().unwrap_or("tls"))
                && s("username") == want["username"].as_str()
                && s("im_mode") == want["imMode"].as_str()
                && got.get("allow_md5").and_then(toml::Value::as_bool)
                    == want["allowMd5"].as_bool().filter(|b| *b),
            "[[sip.peers]] {got:?}, the values give {want}"
        );
        let sources: Vec<&str> = got
            .get("sources")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(toml::Value::as_str)
            .collect();
        let want_sources: Vec<&str> = want["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        ensure!(
            sources == want_sources,
            "{domain}: sources {sources:?}, the values give {want_sources:?}"
        );
        ensure!(
            got.get("password").is_none(),
            "{domain}: an inline password in the ConfigMap"
        );
        let secret = &want["passwordSecret"];
        if secret.is_null() {
            ensure!(
                got.get("password_file").is_none(),
                "{domain}: a password file without passwordSecret"
            );
        } else {
            let key = match &secret["key"] {
                Value::Null => Value::from(domain),
                k => k.clone(),
            };
            files.push((
                format!("sip.peers[{domain}].password_file"),
                s("password_file")
                    .with_context(|| format!("{domain}: no password_file"))?
                    .to_string(),
                secret["secretName"].clone(),
                key,
            ));
            with_password += 1;
        }
    }
    ensure!(
        with_password == 1,
        "the ci file should give one peer digest credentials"
    );
    ensure!(
        want_peers
            .iter()
            .any(|p| p["transport"].is_null() && p["address"].is_string())
            && want_peers
                .iter()
                .any(|p| p["transport"] == "udp" && p["sources"].is_array()),
        "the ci file should have a peer on TLS (the default) and one on UDP with sources"
    );
    for (what, path, secret, secret_key) in &files {
        let (want_secret, want_key) = secret
            .as_str()
            .zip(secret_key.as_str())
            .with_context(|| format!("the ci file gives no Secret for {what}"))?;
        let (got_secret, got_key) =
            mounted_secret(spec, relay, path).with_context(|| what.clone())?;
        ensure!(
            got_secret == want_secret && got_key == want_key,
            "{what} = {path} is {got_secret}/{got_key} in the pod, not {want_secret}/{want_key}"
        );
    }

    // The limits given, and no other.
    let mut set = 0;
    for (value, key) in [
        ("maxMessageBytes", "max_message_bytes"),
        ("ratePerSource", "rate_per_source"),
        ("burstPerSource", "burst_per_source"),
        ("t1Ms", "t1_ms"),
        ("maxSubscriptionSecs", "max_subscription_secs"),
        ("connectTimeoutSecs", "connect_timeout_secs"),
    ] {
        ensure!(default(&[value]).is_null(), "values.yaml sets sip.{value}");
        let got = sip.get(key).map(|v| v.as_integer());
        ensure!(
            got == x[value].as_i64().map(Some),
            "sip.{key} is {got:?}, the values give {}",
            x[value]
        );
        set += usize::from(got.is_some());
    }
    ensure!(
        (1..6).contains(&set),
        "the ci file should set some limits and leave others"
    );
    ensure!(
        sip.get("dns_server").is_none(),
        "[sip] has keys no value asked for: {sip:?}"
    );
    // A SIP domain is a name and a platform: no secret, delivery or tenant.
    let sip_domains: Vec<&toml::Value> = toml
        .get("domains")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| d.get("platform").and_then(toml::Value::as_str) == Some("sip"))
        .collect();
    ensure!(
        sip_domains.len() == want_peers.len()
            && sip_domains
                .iter()
                .all(|d| d.as_table().is_some_and(|t| t.len() == 2)),
        "the SIP domains in relay.toml: {sip_domains:?}"
    );

    // check-config accepts it, and does check the edge: without [sip] the same file is refused,
    // and so it is without the UDP listener the UDP peer needs.
    let env = pod_env(sts)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &text)?;
    let out = check_config(&file, &env, true)?;
    ensure!(
        out.status.success() && output_text(&out).contains(": ok ("),
        "relay-node check-config refuses the SIP variant:\n{}\n{text}",
        output_text(&out)
    );
    let without: Vec<&str> = text
        .split("\n\n")
        .filter(|block| !block.starts_with("[sip]") && !block.starts_with("[[sip.peers]]"))
        .collect();
    ensure!(without.len() + 1 + want_peers.len() == text.split("\n\n").count());
    let no_edge = dir.path().join("no-edge.toml");
    std::fs::write(&no_edge, without.join("\n\n"))?;
    let out = check_config(&no_edge, &env, true)?;
    ensure!(
        !out.status.success() && output_text(&out).contains("no [sip] section"),
        "check-config took SIP domains without [sip]:\n{}",
        output_text(&out)
    );
    let no_udp: Vec<&str> = text.lines().filter(|l| !l.starts_with("udp = ")).collect();
    ensure!(no_udp.len() + 1 == text.lines().count());
    let no_udp_file = dir.path().join("no-udp.toml");
    std::fs::write(&no_udp_file, no_udp.join("\n"))?;
    let out = check_config(&no_udp_file, &env, true)?;
    ensure!(
        !out.status.success() && output_text(&out).contains("no listener"),
        "check-config took a UDP peer without the UDP listener:\n{}",
        output_text(&out)
    );

    // NetworkPolicy: networkPolicy.sipFrom in on exactly the enabled transports' ports; out to
    // networkPolicy.egress.sipPorts over UDP and TCP (both transports are on), and to the port of
    // every sip.peers[].address over that peer's transport only.
    let rule = r
        .ingress_rule
        .context("no NetworkPolicy ingress rule for the SIP edge")?;
    let rule_ports: BTreeSet<(i64, String)> = rule["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["port"].as_i64()?, p["protocol"].as_str()?.to_string())))
        .collect();
    let want_rule: BTreeSet<(i64, String)> = want_ports
        .iter()
        .map(|(_, p, pr)| (*p, pr.clone()))
        .collect();
    ensure!(
        rule_ports == want_rule,
        "the SIP ingress rule's ports are {rule_ports:?}, not {want_rule:?}"
    );
    let sip_from = &values["networkPolicy"]["sipFrom"];
    ensure!(
        sip_from.as_array().is_some_and(|f| !f.is_empty()) && &rule["from"] == sip_from,
        "the SIP ingress rule admits {}, networkPolicy.sipFrom is {sip_from}",
        rule["from"]
    );
    let ports = egress_port_protocols_to(&docs, &Value::Null)?;
    let mut want_egress = BTreeSet::new();
    for p in values["networkPolicy"]["egress"]["sipPorts"]
        .as_array()
        .context("the ci file has no networkPolicy.egress.sipPorts")?
    {
        let p = p.as_i64().context("a sipPorts entry is not a port")?;
        want_egress.insert((p, "TCP".to_string()));
        want_egress.insert((p, "UDP".to_string()));
    }
    let mut not_wanted = BTreeSet::new();
    for p in want_peers {
        if let Some(port) = p["address"]
            .as_str()
            .and_then(|a| a.rsplit_once(':')?.1.parse::<i64>().ok())
        {
            let udp = p["transport"] == "udp";
            want_egress.insert((port, if udp { "UDP" } else { "TCP" }.to_string()));
            if !want_egress.contains(&(port, if udp { "TCP" } else { "UDP" }.to_string())) {
                not_wanted.insert((port, if udp { "TCP" } else { "UDP" }.to_string()));
            }
        }
    }
    ensure!(
        want_egress.len() >= 7 && want_egress.is_subset(&ports),
        "egress to SIP peers on {ports:?}, not all of {want_egress:?}"
    );
    ensure!(
        !not_wanted.is_empty() && not_wanted.is_disjoint(&ports),
        "egress to a peer's port over a transport it does not use: {ports:?}"
    );

    // The same values with the edge off: refused, naming the SIP domains.
    match template(Some(&values_file), &["sip.enabled=false"])? {
        Ok(_) => bail!("SIP domains rendered with sip.enabled=false"),
        Err(e) => ensure!(
            e.contains("sfb.partner.example") && e.contains("sip.enabled=true"),
            "{e}"
        ),
    }
    Ok(())
}

/// The SIP Service, container ports and NetworkPolicy rule follow the transports turned on,
/// each with its protocol (UDP and TCP on one Service); externalTrafficPolicy is rendered for
/// a LoadBalancer or NodePort only; a DNS server on another port opens that port.
#[test]
fn the_sip_service_exposes_the_enabled_transports() -> Result<()> {
    let base = [
        "sip.enabled=true",
        "sip.host=sip.contoso.example",
        "sip.tls.secretName=sip-tls",
        "networkPolicy.enabled=true",
    ];
    // (more --set values, the SIP ports: name, port, protocol)
    type Case = (
        &'static [&'static str],
        &'static [(&'static str, i64, &'static str)],
    );
    let cases: [Case; 4] = [
        (&[], &[("sip-tls", 5061, "TCP")]),
        (
            &["sip.udp.enabled=true", "sip.tcp.enabled=true"],
            &[
                ("sip-udp", 5060, "UDP"),
                ("sip-tcp", 5060, "TCP"),
                ("sip-tls", 5061, "TCP"),
            ],
        ),
        (
            &["sip.tls.enabled=false", "sip.tcp.enabled=true"],
            &[("sip-tcp", 5060, "TCP")],
        ),
        (
            &[
                "sip.tls.enabled=false",
                "sip.udp.enabled=true",
                "sip.udp.port=15060",
                "sip.service.type=ClusterIP",
            ],
            &[("sip-udp", 15060, "UDP")],
        ),
    ];
    for (sets, want) in cases {
        let all: Vec<&str> = base.iter().chain(sets).copied().collect();
        let yaml =
            template(None, &all)?.map_err(|e| anyhow::anyhow!("{all:?} did not render:\n{e}"))?;
        let docs = documents(&yaml)?;
        let want: BTreeSet<(String, i64, String)> = want
            .iter()
            .map(|(n, p, pr)| (n.to_string(), *p, pr.to_string()))
            .collect();
        let r = sip_rendering(&docs)?;
        ensure!(
            r.container_ports == want && r.service_ports == want,
            "{sets:?}: container ports {:?}, Service ports {:?}, not {want:?}",
            r.container_ports,
            r.service_ports
        );
        let svc = r
            .service
            .with_context(|| format!("{sets:?}: no SIP Service"))?;
        let cluster_ip = sets.contains(&"sip.service.type=ClusterIP");
        ensure!(
            svc["spec"]["externalTrafficPolicy"]
                == if cluster_ip {
                    Value::Null
                } else {
                    Value::from("Local")
                },
            "{sets:?}: externalTrafficPolicy {}",
            svc["spec"]["externalTrafficPolicy"]
        );
        let rule = r
            .ingress_rule
            .with_context(|| format!("{sets:?}: no SIP ingress rule"))?;
        let rule_ports: BTreeSet<(i64, String)> = rule["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["port"].as_i64()?, p["protocol"].as_str()?.to_string())))
            .collect();
        let want_rule: BTreeSet<(i64, String)> =
            want.iter().map(|(_, p, pr)| (*p, pr.clone())).collect();
        ensure!(
            rule_ports == want_rule && rule["from"].is_null(),
            "{sets:?}: the SIP ingress rule is {rule}"
        );
        let toml = toml_table(&relay_toml(&docs)?)?;
        for (t, _) in SIP_TRANSPORTS {
            let listens = toml.get("sip").and_then(|s| s.get(t)).is_some();
            ensure!(
                listens == want.iter().any(|(n, _, _)| n == &format!("sip-{t}")),
                "{sets:?}: sip.{t} in relay.toml: {listens}"
            );
        }
    }

    // externalTrafficPolicy Cluster when asked; a DNS server on port 5353 is reachable.
    let all: Vec<&str> = base
        .iter()
        .copied()
        .chain([
            "sip.service.externalTrafficPolicy=Cluster",
            "sip.dnsServer=10.0.0.10:5353",
        ])
        .collect();
    let docs = documents(
        &template(None, &all)?.map_err(|e| anyhow::anyhow!("{all:?} did not render:\n{e}"))?,
    )?;
    let svc = sip_rendering(&docs)?.service.context("no SIP Service")?;
    ensure!(
        svc["spec"]["externalTrafficPolicy"] == "Cluster",
        "externalTrafficPolicy {}",
        svc["spec"]["externalTrafficPolicy"]
    );
    let toml = toml_table(&relay_toml(&docs)?)?;
    ensure!(
        toml.get("sip").and_then(|s| s.get("dns_server"))
            == Some(&toml::Value::from("10.0.0.10:5353")),
        "sip.dns_server is not the value's"
    );
    let ports = egress_port_protocols_to(&docs, &Value::Null)?;
    ensure!(
        ports.contains(&(5353, "UDP".into())) && ports.contains(&(5353, "TCP".into())),
        "no egress to the SIP DNS server's port: {ports:?}"
    );
    Ok(())
}

fn toml_str<'a>(t: &'a toml::Table, at: &str, key: &str) -> Result<&'a str> {
    t.get(key)
        .and_then(toml::Value::as_str)
        .with_context(|| format!("relay.toml has no string {at}.{key}"))
}

/// The API variant (`ci/api.yaml`) serves the management API to clients in the cluster:
/// relay.toml's `[api]` listens on the pods' address, on the container port that the `-api`
/// ClusterIP Service targets; its certificate, key, bootstrap token and the OIDC provider's CA
/// are files mounted read-only from the Secrets and keys the values give; `[api.oidc]` carries
/// the values; `check-config` accepts it, and refuses it without TLS, with an `http://` issuer or
/// without an audience, which the chart refuses to render; the NetworkPolicy lets
/// `networkPolicy.apiFrom` in on the API port and the pods out to the provider's port. With
/// `exposure: loopback` the API listens on 127.0.0.1 only (kubectl port-forward), without a
/// Service, a container port or a NetworkPolicy rule; with `enabled: false` it is not there.
#[test]
fn the_api_variant_serves_the_management_api_with_its_secrets_mounted() -> Result<()> {
    let values_file = chart().join("ci/api.yaml");
    let values: Value = serde_norway::from_str(&std::fs::read_to_string(&values_file)?)?;
    let defaults: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    // A value of the ci file, or the default.
    let value = |path: &[&str]| -> Value {
        let get = |root: &Value| {
            let mut v = root;
            for p in path {
                v = &v[*p];
            }
            v.clone()
        };
        match get(&values["api"]) {
            Value::Null => get(&defaults["api"]),
            v => v,
        }
    };
    let docs = render("ci/api.yaml", Some(&values_file))?;
    let text = relay_toml(&docs)?;
    let toml = toml_table(&text)?;
    let api = toml
        .get("api")
        .and_then(toml::Value::as_table)
        .context("relay.toml has no [api]")?;
    let oidc = api
        .get("oidc")
        .and_then(toml::Value::as_table)
        .context("relay.toml has no [api.oidc]")?;
    let portal = oidc
        .get("portal")
        .and_then(toml::Value::as_table)
        .context("relay.toml has no [api.oidc.portal]")?;
    let sts = find(&docs, "StatefulSet", &fullname())?;
    let spec = &sts["spec"]["template"]["spec"];
    let relay = relay_container(sts)?;

    // The metadata log's archive reaches the config.
    let meta = toml
        .get("metadata")
        .and_then(toml::Value::as_table)
        .context("relay.toml has no [metadata]")?;
    ensure!(
        toml_str(meta, "metadata", "archive_url")? == "s3://fedrelay-metadata/prod"
            && meta.get("redis_window_days") == Some(&toml::Value::Integer(7)),
        "[metadata] is {meta:?}"
    );

    // On the pods' address, on the container port the Service targets; HTTPS only.
    let port = value(&["port"])
        .as_i64()
        .context("no api.port in values.yaml")?;
    ensure!(
        toml_str(api, "api", "listen")? == format!("0.0.0.0:{port}"),
        "api.listen is {}",
        toml_str(api, "api", "listen")?
    );
    ensure!(
        api.get("allow_plaintext") == Some(&toml::Value::Boolean(false)),
        "api.allow_plaintext is {:?} with TLS",
        api.get("allow_plaintext")
    );
    let container_port = relay["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "api")
        .context("the relay container has no api port")?;
    ensure!(
        container_port["containerPort"] == port && container_port["protocol"] == "TCP",
        "the api port is {container_port}"
    );
    let svc = find(&docs, "Service", &format!("{}-api", fullname()))?;
    let svc_port = &svc["spec"]["ports"][0];
    ensure!(
        svc["spec"]["type"] == "ClusterIP"
            && svc["spec"]["ports"]
                .as_array()
                .is_some_and(|p| p.len() == 1)
            && svc_port["name"] == "https"
            && svc_port["port"] == value(&["service", "port"])
            && svc_port["targetPort"] == "api"
            && svc_port["protocol"] == "TCP",
        "the API Service is {}",
        svc["spec"]
    );
    ensure!(
        svc["metadata"]["annotations"] == values["api"]["service"]["annotations"],
        "the API Service's annotations are {}",
        svc["metadata"]["annotations"]
    );
    ensure!(
        svc["metadata"]["labels"]["app.kubernetes.io/component"] == "relay-api",
        "the API Service's labels are {}",
        svc["metadata"]["labels"]
    );

    // Certificate, key, bootstrap token and the provider's CA: files from the values' Secrets.
    let tls_secret = value(&["tls", "secretName"]);
    for (table, at, key, secret, secret_key) in [
        (
            api,
            "api",
            "tls_cert",
            tls_secret.clone(),
            Value::from("tls.crt"),
        ),
        (api, "api", "tls_key", tls_secret, Value::from("tls.key")),
        (
            api,
            "api",
            "bootstrap_token_file",
            value(&["bootstrapToken", "secretName"]),
            value(&["bootstrapToken", "key"]),
        ),
        (
            oidc,
            "api.oidc",
            "ca_file",
            value(&["oidc", "caSecretName"]),
            value(&["oidc", "caKey"]),
        ),
        (
            portal,
            "api.oidc.portal",
            "client_secret_file",
            value(&["oidc", "portal", "clientSecret", "secretName"]),
            value(&["oidc", "portal", "clientSecret", "key"]),
        ),
    ] {
        let (want_secret, want_key) = secret
            .as_str()
            .zip(secret_key.as_str())
            .with_context(|| format!("the ci file gives no Secret for {at}.{key}"))?;
        let path = toml_str(table, at, key)?;
        let (got_secret, got_key) =
            mounted_secret(spec, relay, path).with_context(|| format!("{at}.{key}"))?;
        ensure!(
            got_secret == want_secret && got_key == want_key,
            "{at}.{key} = {path} is {got_secret}/{got_key} in the pod, not {want_secret}/{want_key}"
        );
    }
    ensure!(
        value(&["bootstrapToken", "key"]) != defaults["api"]["bootstrapToken"]["key"]
            && value(&["oidc", "caKey"]) != defaults["api"]["oidc"]["caKey"],
        "the ci file should name keys other than the defaults"
    );

    // [api.oidc] as the values give it, defaults where they give none.
    for (key, v) in [
        ("issuer", "issuer"),
        ("audience", "audience"),
        ("jwks_url", "jwksUrl"),
        ("roles_claim", "rolesClaim"),
        ("domains_claim", "domainsClaim"),
    ] {
        ensure!(
            Some(toml_str(oidc, "api.oidc", key)?) == value(&["oidc", v]).as_str(),
            "api.oidc.{key} is {}, the values give {}",
            toml_str(oidc, "api.oidc", key)?,
            value(&["oidc", v])
        );
    }
    ensure!(
        oidc.get("clock_skew_secs")
            .and_then(toml::Value::as_integer)
            == value(&["oidc", "clockSkewSecs"]).as_i64(),
        "api.oidc.clock_skew_secs is {:?}",
        oidc.get("clock_skew_secs")
    );
    // [api.oidc.portal] likewise.
    for (key, v) in [
        ("client_id", "clientId"),
        ("redirect_url", "redirectUrl"),
        ("scopes", "scopes"),
    ] {
        ensure!(
            Some(toml_str(portal, "api.oidc.portal", key)?)
                == value(&["oidc", "portal", v]).as_str(),
            "api.oidc.portal.{key} is {}, the values give {}",
            toml_str(portal, "api.oidc.portal", key)?,
            value(&["oidc", "portal", v])
        );
    }
    ensure!(
        portal.get("session_secs").and_then(toml::Value::as_integer)
            == defaults["api"]["oidc"]["portal"]["sessionSecs"].as_i64(),
        "api.oidc.portal.session_secs is {:?}",
        portal.get("session_secs")
    );

    // check-config accepts it, and refuses what the chart refuses to render: the API on the
    // pods' address without TLS, an issuer that is not https://, OIDC without an audience.
    let env = pod_env(sts)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &text)?;
    let out = check_config(&file, &env, true)?;
    ensure!(
        out.status.success() && output_text(&out).contains(": ok ("),
        "relay-node check-config refuses the API variant:\n{}\n{text}",
        output_text(&out)
    );
    let issuer = toml_str(oidc, "api.oidc", "issuer")?;
    let plain_issuer = issuer.replacen("https://", "http://", 1);
    let audience_line = format!(
        "audience = {}\n",
        toml::Value::from(toml_str(oidc, "api.oidc", "audience")?)
    );
    let redirect = toml_str(portal, "api.oidc.portal", "redirect_url")?;
    let elsewhere = redirect.replace("/portal/callback", "/elsewhere");
    let mut no_tls = text.clone();
    for key in ["tls_cert", "tls_key"] {
        no_tls = no_tls.replace(&format!("{key} = \"{}\"\n", toml_str(api, "api", key)?), "");
    }
    for (what, broken, relay_says, sets, chart_says) in [
        (
            "no TLS",
            no_tls,
            "without TLS",
            vec!["api.tls.secretName=".to_string()],
            vec!["api.tls.secretName", "api.allowPlaintext"],
        ),
        (
            "an http:// issuer",
            text.replace(issuer, &plain_issuer),
            "issuer",
            vec![format!("api.oidc.issuer={plain_issuer}")],
            vec!["api.oidc.issuer", "https://"],
        ),
        (
            "no audience",
            text.replace(&audience_line, ""),
            "audience",
            vec!["api.oidc.audience=".to_string()],
            vec!["api.oidc.audience"],
        ),
        (
            "a portal redirect that is not its callback",
            text.replace(redirect, &elsewhere),
            "redirect_url",
            vec![format!("api.oidc.portal.redirectUrl={elsewhere}")],
            vec!["api.oidc.portal.redirectUrl", "/portal/callback"],
        ),
    ] {
        ensure!(broken != text, "{what}: nothing removed from relay.toml");
        let f = dir.path().join("broken.toml");
        std::fs::write(&f, &broken)?;
        let out = check_config(&f, &env, true)?;
        ensure!(
            !out.status.success() && output_text(&out).contains(relay_says),
            "{what}: check-config did not refuse it:\n{}",
            output_text(&out)
        );
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        match template(Some(&values_file), &sets)? {
            Ok(_) => bail!("{what} ({sets:?}) rendered"),
            Err(e) => {
                for w in chart_says {
                    ensure!(e.contains(w), "{what}: the error does not name {w}:\n{e}");
                }
            }
        }
    }

    // NetworkPolicy: the API port from networkPolicy.apiFrom only; HTTPS out to httpsTo on
    // httpsPorts and the provider's port (8443 in the ci file).
    let np = find(&docs, "NetworkPolicy", &fullname())?;
    let rules: Vec<&Value> = np["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["port"] == port)
        })
        .collect();
    let api_from = &values["networkPolicy"]["apiFrom"];
    ensure!(
        api_from.as_array().is_some_and(|a| !a.is_empty())
            && rules.len() == 1
            && rules[0]["ports"] == serde_json::json!([{"port": port, "protocol": "TCP"}])
            && &rules[0]["from"] == api_from,
        "the NetworkPolicy rules for the API port are {rules:?}"
    );
    let https_to = &values["networkPolicy"]["egress"]["httpsTo"];
    let ports = egress_ports_to(&docs, https_to)?;
    ensure!(
        https_to.is_array() && ports == BTreeSet::from([443, 8443]),
        "egress to {https_to} on {ports:?}, not 443 and the provider's 8443"
    );

    // Plain HTTP on the pods' address when allowed (behind a TLS-terminating proxy).
    let plain = documents(
        &template(
            Some(&values_file),
            &["api.tls.secretName=", "api.allowPlaintext=true"],
        )?
        .map_err(|e| anyhow::anyhow!("api.allowPlaintext=true did not render:\n{e}"))?,
    )?;
    let plain_text = relay_toml(&plain)?;
    let plain_api = toml_table(&plain_text)?;
    let plain_api = plain_api
        .get("api")
        .and_then(toml::Value::as_table)
        .context("no [api] with api.allowPlaintext")?;
    ensure!(
        plain_api.get("allow_plaintext") == Some(&toml::Value::Boolean(true))
            && plain_api.get("tls_cert").is_none()
            && find(&plain, "Service", &format!("{}-api", fullname()))?["spec"]["ports"][0]["name"]
                == "http",
        "[api] with api.allowPlaintext: {plain_api:?}"
    );
    std::fs::write(&file, &plain_text)?;
    let out = check_config(
        &file,
        &pod_env(find(&plain, "StatefulSet", &fullname())?)?,
        true,
    )?;
    ensure!(
        out.status.success(),
        "check-config refuses the API in plain HTTP with allow_plaintext:\n{}",
        output_text(&out)
    );

    // On loopback (kubectl port-forward): no Service, container port or ingress rule, and no
    // TLS needed.
    let loopback = documents(
        &template(
            Some(&values_file),
            &["api.exposure=loopback", "api.tls.secretName="],
        )?
        .map_err(|e| anyhow::anyhow!("api.exposure=loopback did not render:\n{e}"))?,
    )?;
    let loopback_text = relay_toml(&loopback)?;
    let loopback_toml = toml_table(&loopback_text)?;
    ensure!(
        loopback_toml.get("api").and_then(|a| a.get("listen"))
            == Some(&toml::Value::from(format!("127.0.0.1:{port}"))),
        "api.listen with api.exposure=loopback: {:?}",
        loopback_toml.get("api")
    );
    let loopback_sts = find(&loopback, "StatefulSet", &fullname())?;
    ensure!(
        relay_container(loopback_sts)?["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|p| p["name"] != "api")
            && !loopback
                .iter()
                .any(|d| kind(d) == "Service" && name(d) == format!("{}-api", fullname())),
        "a container port or Service for an API on loopback"
    );
    let np = find(&loopback, "NetworkPolicy", &fullname())?;
    ensure!(
        np["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["ports"].as_array().into_iter().flatten())
            .all(|p| p["port"] != port),
        "a NetworkPolicy rule for an API on loopback: {}",
        np["spec"]["ingress"]
    );
    std::fs::write(&file, &loopback_text)?;
    let out = check_config(&file, &pod_env(loopback_sts)?, true)?;
    ensure!(
        out.status.success(),
        "check-config refuses the API on loopback without TLS:\n{}",
        output_text(&out)
    );

    // Off: no [api], nothing mounted for it.
    let off = documents(
        &template(Some(&values_file), &["api.enabled=false"])?
            .map_err(|e| anyhow::anyhow!("api.enabled=false did not render:\n{e}"))?,
    )?;
    ensure!(
        !toml_table(&relay_toml(&off)?)?.contains_key("api"),
        "[api] with api.enabled=false"
    );
    let off_sts = find(&off, "StatefulSet", &fullname())?;
    ensure!(
        !off_sts["spec"]["template"]["spec"]["volumes"]
            .to_string()
            .contains("fedrelay-api-tls")
            && !off
                .iter()
                .any(|d| kind(d) == "Service" && name(d) == format!("{}-api", fullname())),
        "API Secrets or Service with api.enabled=false"
    );
    Ok(())
}

fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "StatefulSet" | "Deployment" | "Job" | "DaemonSet"))
        .map(|d| {
            (
                format!("{} {}", kind(d), name(d)),
                &d["spec"]["template"]["spec"],
            )
        })
        .collect()
}

#[test]
fn pods_are_locked_down_and_the_grace_period_covers_the_drain() -> Result<()> {
    for (case, values) in cases()? {
        let docs = render(&case, values.as_deref())?;
        let pods = pod_specs(&docs);
        ensure!(!pods.is_empty(), "{case}: no pods");
        for (what, spec) in &pods {
            let what = format!("{case}: {what}");
            // Service links would put <SERVICE>_PORT… variables in the pod: for a release
            // named "fedrelay…" those are FEDRELAY_* names the relay reads as config.
            ensure!(
                spec["enableServiceLinks"] == false,
                "{what}: service links are on"
            );
            let psc = &spec["securityContext"];
            ensure!(psc["runAsNonRoot"] == true, "{what}: runAsNonRoot not set");
            ensure!(
                psc["runAsUser"].as_i64().is_some_and(|u| u > 0),
                "{what}: runAsUser {}",
                psc["runAsUser"]
            );
            ensure!(
                psc["seccompProfile"]["type"] == "RuntimeDefault",
                "{what}: seccomp profile {}",
                psc["seccompProfile"]
            );
            ensure!(
                spec["automountServiceAccountToken"] == false,
                "{what}: mounts a service account token"
            );
            let containers = spec["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(spec["initContainers"].as_array().into_iter().flatten());
            for c in containers {
                let sc = &c["securityContext"];
                let cname = c["name"].as_str().unwrap_or("?");
                ensure!(
                    sc["readOnlyRootFilesystem"] == true,
                    "{what}/{cname}: root filesystem not read-only"
                );
                ensure!(
                    sc["allowPrivilegeEscalation"] == false,
                    "{what}/{cname}: privilege escalation allowed"
                );
                ensure!(
                    sc["runAsNonRoot"] == true && sc["privileged"] != true,
                    "{what}/{cname}: may run as root or privileged"
                );
                ensure!(
                    sc["capabilities"]["drop"]
                        .as_array()
                        .is_some_and(|d| d.iter().any(|c| c == "ALL")),
                    "{what}/{cname}: capabilities not all dropped"
                );
                ensure!(
                    sc["capabilities"]["add"].is_null(),
                    "{what}/{cname}: adds capabilities"
                );
                ensure!(
                    c["resources"]["requests"].is_object(),
                    "{what}/{cname}: no resource requests"
                );
            }
        }

        let sts = find(&docs, "StatefulSet", &fullname())?;
        let toml = toml_table(&relay_toml(&docs)?)?;
        let spec = &sts["spec"]["template"]["spec"];
        let relay = relay_container(sts)?;
        let pre_stop = &relay["lifecycle"]["preStop"];
        let delay = if pre_stop.is_null() {
            0
        } else if let Some(s) = pre_stop["sleep"]["seconds"].as_i64() {
            s
        } else {
            pre_stop["exec"]["command"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("{case}: preStop {pre_stop}"))?
        };
        ensure!(delay > 0, "{case}: no preStop delay");
        let drain = toml_int(&toml, "shutdown", "drain_timeout_secs")?;
        let grace = spec["terminationGracePeriodSeconds"]
            .as_i64()
            .with_context(|| format!("{case}: no terminationGracePeriodSeconds"))?;
        ensure!(
            grace >= delay + drain,
            "{case}: terminationGracePeriodSeconds {grace} < preStop {delay} + drain {drain}"
        );

        // Probes on the admin listener the config opens.
        let admin = listen_port(&toml, "admin")?;
        let port_of = |name: &str| {
            relay["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .and_then(|p| p["containerPort"].as_i64())
        };
        ensure!(
            port_of("admin") == Some(admin),
            "{case}: admin port differs from admin.listen"
        );
        ensure!(
            port_of("http") == Some(listen_port(&toml, "http")?),
            "{case}: http port differs from http.listen"
        );
        // The XMPP edge's port, Service and NetworkPolicy rule exist exactly when it listens.
        let xmpp_service = docs
            .iter()
            .find(|d| kind(d) == "Service" && name(d) == format!("{}-xmpp", fullname()));
        if toml.contains_key("xmpp") {
            let port = listen_port(&toml, "xmpp")?;
            ensure!(
                port_of("xmpp-server") == Some(port),
                "{case}: the xmpp-server port differs from xmpp.listen"
            );
            let svc = xmpp_service.with_context(|| format!("{case}: no XMPP Service"))?;
            ensure!(
                svc["spec"]["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["targetPort"] == "xmpp-server")),
                "{case}: the XMPP Service does not target the xmpp-server port: {}",
                svc["spec"]
            );
            if let Some(np) = docs
                .iter()
                .find(|d| kind(d) == "NetworkPolicy" && name(d) == fullname())
            {
                ensure!(
                    np["spec"]["ingress"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|r| r["ports"].as_array().into_iter().flatten())
                        .any(|p| p["port"].as_i64() == Some(port)),
                    "{case}: the NetworkPolicy lets nothing reach the XMPP edge"
                );
            }
        } else {
            ensure!(
                port_of("xmpp-server").is_none() && xmpp_service.is_none(),
                "{case}: an XMPP port or Service without the edge in relay.toml"
            );
        }
        // Likewise the SIP edge's: a port per transport it listens on, each on the Service (same
        // port and protocol) and in the NetworkPolicy.
        let sip = sip_rendering(&docs)?;
        if let Some(s) = toml.get("sip") {
            let mut want = BTreeSet::new();
            for (t, protocol) in SIP_TRANSPORTS {
                if let Some(listen) = s.get(t).and_then(toml::Value::as_str) {
                    let port: i64 = listen
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .with_context(|| format!("{case}: sip.{t} {listen} has no port"))?;
                    want.insert((format!("sip-{t}"), port, protocol.to_string()));
                }
            }
            ensure!(
                !want.is_empty() && sip.container_ports == want && sip.service_ports == want,
                "{case}: the SIP listeners {want:?}, container ports {:?}, Service ports {:?}",
                sip.container_ports,
                sip.service_ports
            );
            if docs
                .iter()
                .any(|d| kind(d) == "NetworkPolicy" && name(d) == fullname())
            {
                ensure!(
                    sip.ingress_rule.is_some(),
                    "{case}: the NetworkPolicy lets nothing reach the SIP edge"
                );
            }
        } else {
            ensure!(
                sip.container_ports.is_empty() && sip.service.is_none(),
                "{case}: a SIP port or Service without the edge in relay.toml"
            );
        }
        // The management API: on loopback (kubectl port-forward) no port, Service or
        // NetworkPolicy rule; on the pods' address a container port, the `-api` Service (never
        // the HTTP edge's) and an ingress rule.
        let api_service = docs
            .iter()
            .find(|d| kind(d) == "Service" && name(d) == format!("{}-api", fullname()));
        let edge = find(&docs, "Service", &fullname())?;
        ensure!(
            edge["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|p| p["targetPort"] == "http"),
            "{case}: the HTTP edge's Service exposes more than the edge: {}",
            edge["spec"]
        );
        let api_listen = toml
            .get("api")
            .and_then(|a| a.get("listen"))
            .and_then(toml::Value::as_str);
        match api_listen {
            Some(listen) if !listen.starts_with("127.0.0.1:") => {
                let port = listen_port(&toml, "api")?;
                ensure!(
                    port_of("api") == Some(port),
                    "{case}: the api port differs from api.listen"
                );
                let svc = api_service.with_context(|| format!("{case}: no API Service"))?;
                ensure!(
                    svc["spec"]["type"] == "ClusterIP"
                        && svc["spec"]["ports"]
                            .as_array()
                            .is_some_and(|ps| ps.iter().all(|p| p["targetPort"] == "api")),
                    "{case}: the API Service is {}",
                    svc["spec"]
                );
                if let Some(np) = docs
                    .iter()
                    .find(|d| kind(d) == "NetworkPolicy" && name(d) == fullname())
                {
                    ensure!(
                        np["spec"]["ingress"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .flat_map(|r| r["ports"].as_array().into_iter().flatten())
                            .any(|p| p["port"].as_i64() == Some(port)),
                        "{case}: the NetworkPolicy lets nothing reach the management API"
                    );
                }
            }
            _ => ensure!(
                port_of("api").is_none() && api_service.is_none(),
                "{case}: an API port or Service while the API listens on {api_listen:?}"
            ),
        }
        for (probe, path) in [
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
            ("startupProbe", "/healthz"),
        ] {
            let get = &relay[probe]["httpGet"];
            ensure!(
                get["path"] == path && get["port"] == "admin",
                "{case}: {probe} is {}",
                relay[probe]
            );
        }

        // Stable node ids, the headless Service, the gRPC address peers dial.
        let headless = format!("{}-headless", fullname());
        ensure!(
            sts["spec"]["serviceName"] == headless.as_str(),
            "{case}: serviceName {}",
            sts["spec"]["serviceName"]
        );
        ensure!(
            sts["spec"]["podManagementPolicy"] == "Parallel",
            "{case}: podManagementPolicy"
        );
        let svc = find(&docs, "Service", &headless)?;
        ensure!(
            svc["spec"]["clusterIP"] == "None" && svc["spec"]["publishNotReadyAddresses"] == true,
            "{case}: the headless Service is {}",
            svc["spec"]
        );
        let env = pod_env(sts)?;
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        ensure!(
            var("FEDRELAY_NODE_ID") == Some(&format!("{}-0", fullname())),
            "{case}: FEDRELAY_NODE_ID is not the pod name"
        );
        if let Some(cluster) = toml.get("cluster") {
            ensure!(
                cluster.get("membership").and_then(toml::Value::as_str) == Some("etcd"),
                "{case}: a cluster section without etcd membership"
            );
            let grpc = port_of("grpc").with_context(|| format!("{case}: no grpc port"))?;
            ensure!(
                var("FEDRELAY_CLUSTER__GRPC_ADVERTISE")
                    == Some(&format!(
                        "{}-0.{headless}.{NAMESPACE}.svc:{grpc}",
                        fullname()
                    )),
                "{case}: FEDRELAY_CLUSTER__GRPC_ADVERTISE is {:?}",
                var("FEDRELAY_CLUSTER__GRPC_ADVERTISE")
            );
            let store = toml.get("store").and_then(|s| s.get("backend"));
            ensure!(
                store.and_then(toml::Value::as_str) == Some("redis"),
                "{case}: a cluster without Redis"
            );
            ensure!(
                docs.iter().any(|d| kind(d) == "PodDisruptionBudget"),
                "{case}: a cluster without a PodDisruptionBudget"
            );
        }

        // The loadtest Job reads the same config and secrets as the relay pods.
        if let Some(job) = docs.iter().find(|d| kind(d) == "Job") {
            let jspec = &job["spec"]["template"]["spec"];
            for v in ["config", "secrets"] {
                let vol = |s: &Value| {
                    s["volumes"]
                        .as_array()
                        .and_then(|vs| vs.iter().find(|x| x["name"] == v))
                        .cloned()
                };
                ensure!(
                    vol(jspec).is_some() && vol(jspec) == vol(spec),
                    "{case}: the loadtest Job's {v} volume differs from the relay pods'"
                );
            }
            let args: Vec<&str> = jspec["containers"][0]["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let after = |flag: &str| {
                args.iter()
                    .position(|a| *a == flag)
                    .and_then(|i| args.get(i + 1))
                    .copied()
            };
            ensure!(
                args.first() == Some(&"run")
                    && after("--config-file") == Some("/etc/fedrelay/relay.toml")
                    && after("--admin")
                        == Some(&format!(
                            "http://{}-admin.{NAMESPACE}.svc:{admin}",
                            fullname()
                        ))
                    && after("--target").is_some_and(|t| t.contains("://"))
                    && after("--rate").is_some()
                    && after("--duration").is_some()
                    && after("--out") == Some("/results"),
                "{case}: loadtest Job args {args:?}"
            );
        }
    }
    Ok(())
}

/// Secret values go into Secrets only: not into a ConfigMap, an environment variable or
/// anything else, in plain text or base64.
#[test]
fn no_secret_value_is_rendered_outside_a_secret() -> Result<()> {
    let values = chart().join("ci/cluster-in-chart.yaml");
    let ci: Value = serde_norway::from_str(&std::fs::read_to_string(&values)?)?;
    let mut secrets: Vec<String> = ci["trialSecrets"]["domains"]
        .as_object()
        .context("ci/cluster-in-chart.yaml has no trialSecrets.domains")?
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let bot = "bot-password-5c1f0a9e7d3b";
    secrets.push(bot.into());
    ensure!(secrets.len() >= 3);
    let sets = [
        "teams.enabled=true",
        "teams.appId=8f0e2c71-5d3a-4b7e-9f21-0c6d4e8a1b35",
        "teams.appTenantId=72f988bf-86f1-41af-91ab-2d7cd011db47",
        &format!("trialSecrets.teamsAppPassword={bot}"),
    ];
    let yaml = template(Some(&values), &sets)?
        .map_err(|e| anyhow::anyhow!("helm template with trial secrets failed:\n{e}"))?;
    let docs = documents(&yaml)?;
    let secret_docs: Vec<&Value> = docs.iter().filter(|d| kind(d) == "Secret").collect();
    ensure!(secret_docs.len() == 1, "expected the one trial Secret");
    for s in &secrets {
        let b64 = base64::engine::general_purpose::STANDARD.encode(s);
        let secret_text = serde_json::to_string(secret_docs[0])?;
        ensure!(
            secret_text.contains(&b64),
            "the trial Secret does not hold {s}"
        );
        for d in docs.iter().filter(|d| kind(d) != "Secret") {
            let text = serde_json::to_string(d)?;
            ensure!(
                !text.contains(s.as_str()) && !text.contains(&b64),
                "a secret value appears in {} {}",
                kind(d),
                name(d)
            );
        }
    }
    // And whatever the case, relay.toml names files, never secrets.
    for (case, values) in cases()? {
        let toml = toml_table(&relay_toml(&render(&case, values.as_deref())?)?)?;
        for d in toml
            .get("domains")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            ensure!(d.get("secret").is_none(), "{case}: an inline domain secret");
        }
        if let Some(t) = toml.get("teams") {
            ensure!(
                t.get("app_password").is_none() && t.get("app_password_file").is_some(),
                "{case}: the bot password is not read from a file"
            );
        }
        for p in toml
            .get("sip")
            .and_then(|s| s.get("peers"))
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            ensure!(
                p.get("password").is_none(),
                "{case}: an inline SIP digest password"
            );
        }
        if let Some(url) = toml
            .get("store")
            .and_then(|s| s.get("redis_url"))
            .and_then(toml::Value::as_str)
        {
            ensure!(!url.contains('@'), "{case}: credentials in redis_url");
        }
    }
    Ok(())
}

/// Bad values fail `helm template` (and so `helm install`) with a message naming them.
#[test]
fn bad_values_fail_rendering_with_a_message_naming_them() -> Result<()> {
    let cases: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::from([
        (
            "negative replicas",
            (
                vec!["replicas=-1"],
                vec!["replicas", "greater than or equal to 1"],
            ),
        ),
        (
            "a domain without a name",
            (vec!["domains[0].platform=http"], vec!["domains.0", "name"]),
        ),
        (
            "an unknown platform",
            (
                vec!["domains[0].name=a.example", "domains[0].platform=matrix"],
                vec!["domains.0.platform", "http", "teams", "xmpp", "sip"],
            ),
        ),
        (
            "an XMPP domain without the XMPP edge",
            (
                vec!["domains[0].name=jabber.example", "domains[0].platform=xmpp"],
                vec!["jabber.example", "platform xmpp", "xmpp.enabled=true"],
            ),
        ),
        (
            "an XMPP domain with an HMAC secret",
            (
                vec![
                    "xmpp.enabled=true",
                    "xmpp.tls.secretName=xmpp-tls",
                    "domains[0].name=jabber.example",
                    "domains[0].platform=xmpp",
                    "domains[0].secret.existingSecret=s",
                ],
                vec!["domains.0"],
            ),
        ),
        (
            "the XMPP edge without its certificate",
            (
                vec!["xmpp.enabled=true"],
                vec!["xmpp.enabled", "xmpp.tls.secretName"],
            ),
        ),
        (
            "the XMPP edge in a cluster without a shared dialback secret",
            (
                vec![
                    "xmpp.enabled=true",
                    "xmpp.tls.secretName=xmpp-tls",
                    "replicas=3",
                    "etcd.enabled=true",
                    "redis.enabled=true",
                    "cluster.allowPlaintext=true",
                ],
                vec![
                    "replicas=3",
                    "xmpp.dialbackSecret.secretName",
                    "every node must share",
                ],
            ),
        ),
        (
            "the XMPP edge autoscaled without a shared dialback secret",
            (
                vec![
                    "xmpp.enabled=true",
                    "xmpp.tls.secretName=xmpp-tls",
                    "autoscaling.enabled=true",
                    "etcd.enabled=true",
                    "redis.enabled=true",
                    "cluster.allowPlaintext=true",
                ],
                vec!["autoscaling.enabled=true", "xmpp.dialbackSecret.secretName"],
            ),
        ),
        (
            "an XMPP peer that is not an XMPP domain",
            (
                vec![
                    "xmpp.enabled=true",
                    "xmpp.tls.secretName=xmpp-tls",
                    "xmpp.peers[0].domain=jabber.example",
                ],
                vec!["xmpp.peers", "jabber.example", "platform xmpp"],
            ),
        ),
        (
            "an XMPP peer address without a port",
            (
                vec![
                    "xmpp.enabled=true",
                    "xmpp.tls.secretName=xmpp-tls",
                    "domains[0].name=jabber.example",
                    "domains[0].platform=xmpp",
                    "xmpp.peers[0].domain=jabber.example",
                    "xmpp.peers[0].address=xmpp.jabber.example",
                ],
                vec!["xmpp.peers.0.address"],
            ),
        ),
        (
            "the removed placeholder switch of the XMPP Service",
            (
                vec!["xmpp.service.enabled=true"],
                vec!["xmpp.service.enabled", "xmpp.enabled=true"],
            ),
        ),
        (
            "a SIP domain without the SIP edge",
            (
                vec!["domains[0].name=sfb.example", "domains[0].platform=sip"],
                vec!["sfb.example", "platform sip", "sip.enabled=true"],
            ),
        ),
        (
            "a SIP domain with an HMAC secret",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "domains[0].secret.existingSecret=s",
                ],
                vec!["domains.0"],
            ),
        ),
        (
            "the SIP edge without a transport",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.enabled=false",
                ],
                vec![
                    "sip.enabled",
                    "transport",
                    "sip.tls.enabled",
                    "sip.udp.enabled",
                ],
            ),
        ),
        (
            "the SIP edge on TLS without its certificate",
            (
                vec!["sip.enabled=true", "sip.host=sip.contoso.example"],
                vec!["sip.tls.enabled", "sip.tls.secretName"],
            ),
        ),
        (
            "the SIP edge without its public name",
            (
                vec!["sip.enabled=true", "sip.tls.secretName=sip-tls"],
                vec!["sip.enabled", "sip.host", "Via"],
            ),
        ),
        (
            "SIP over TCP and TLS on one port",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "sip.tcp.enabled=true",
                    "sip.tcp.port=5061",
                ],
                vec!["sip.tcp.port", "sip.tls.port", "5061"],
            ),
        ),
        (
            "a SIP peer that is not a SIP domain",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "sip.peers[0].domain=sfb.example",
                ],
                vec!["sip.peers", "sfb.example", "platform sip"],
            ),
        ),
        (
            "a SIP peer listed twice",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                    "sip.peers[1].domain=SFB.example",
                ],
                vec!["sip.peers", "SFB.example", "twice"],
            ),
        ),
        (
            "a SIP peer on a transport that is off",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                    "sip.peers[0].transport=udp",
                ],
                vec!["sip.peers", "sfb.example", "udp", "sip.udp.enabled"],
            ),
        ),
        (
            "a SIP peer on TLS (the default) with TLS off",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.enabled=false",
                    "sip.udp.enabled=true",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                ],
                vec!["sip.peers", "sfb.example", "sip.tls.enabled"],
            ),
        ),
        (
            "a SIP peer with a username but no password",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                    "sip.peers[0].username=fedrelay",
                ],
                vec!["sip.peers", "sfb.example", "passwordSecret"],
            ),
        ),
        (
            "a SIP peer with a password but no username",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                    "sip.peers[0].passwordSecret.secretName=sip-peers",
                ],
                vec!["sip.peers", "sfb.example", "username"],
            ),
        ),
        (
            "a SIP peer source that is no address",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                    "sip.peers[0].sources[0]=partner.example",
                ],
                vec!["sip.peers.0.sources.0"],
            ),
        ),
        (
            "an unknown SIP transport",
            (
                vec![
                    "sip.enabled=true",
                    "sip.host=sip.contoso.example",
                    "sip.tls.secretName=sip-tls",
                    "domains[0].name=sfb.example",
                    "domains[0].platform=sip",
                    "sip.peers[0].domain=sfb.example",
                    "sip.peers[0].transport=sctp",
                ],
                vec!["sip.peers.0.transport"],
            ),
        ),
        (
            "the removed placeholder switch of the SIP Service",
            (
                vec!["sip.service.enabled=true"],
                vec!["sip.service.enabled", "sip.enabled=true"],
            ),
        ),
        (
            "a removed placeholder port of the SIP Service",
            (
                vec!["sip.service.tlsPort=5061"],
                vec!["sip.service.tlsPort", "sip.tls.port"],
            ),
        ),
        (
            "the management API on the pods' address without TLS",
            (
                vec!["api.exposure=service"],
                vec![
                    "api.exposure=service",
                    "api.tls.secretName",
                    "api.allowPlaintext=true",
                    "port-forward",
                ],
            ),
        ),
        (
            "an unknown exposure of the management API",
            (vec!["api.exposure=public"], vec!["api.exposure"]),
        ),
        (
            "the management API on the admin port",
            (
                vec!["api.port=9090"],
                vec!["api.port", "admin.port", "9090"],
            ),
        ),
        (
            "the management API on the XMPP edge's port",
            (
                vec![
                    "xmpp.enabled=true",
                    "xmpp.tls.secretName=xmpp-tls",
                    "api.port=5269",
                ],
                vec!["api.port", "xmpp.port", "5269"],
            ),
        ),
        (
            "OIDC without an issuer",
            (
                vec!["api.oidc.audience=urn:fedrelay:api"],
                vec!["api.oidc.issuer", "https://"],
            ),
        ),
        (
            "OIDC without an audience",
            (
                vec!["api.oidc.issuer=https://sso.contoso.example/realms/corp"],
                vec![
                    "api.oidc.issuer=https://sso.contoso.example/realms/corp",
                    "api.oidc.audience",
                ],
            ),
        ),
        (
            "an OIDC issuer that is not https://",
            (
                vec![
                    "api.oidc.issuer=http://sso.contoso.example/realms/corp",
                    "api.oidc.audience=urn:fedrelay:api",
                ],
                vec![
                    "api.oidc.issuer=http://sso.contoso.example/realms/corp",
                    "https://",
                ],
            ),
        ),
        (
            "an OIDC signing-key URL that is not https://",
            (
                vec![
                    "api.oidc.issuer=https://sso.contoso.example/realms/corp",
                    "api.oidc.audience=urn:fedrelay:api",
                    "api.oidc.jwksUrl=http://sso.contoso.example/certs",
                ],
                vec![
                    "api.oidc.jwksUrl=http://sso.contoso.example/certs",
                    "https://",
                ],
            ),
        ),
        (
            "a bootstrap token Secret without a key",
            (
                vec![
                    "api.bootstrapToken.secretName=api-bootstrap",
                    "api.bootstrapToken.key=",
                ],
                vec!["api.bootstrapToken.key"],
            ),
        ),
        (
            "an unknown top-level key",
            (vec!["replicaCount=3"], vec!["replicaCount"]),
        ),
        (
            "an unknown key in a section",
            (vec!["shutdown.drainTimeout=5"], vec!["drainTimeout"]),
        ),
        (
            "a Teams domain without tenant",
            (
                vec!["domains[0].name=a.example", "domains[0].platform=teams"],
                vec!["tenantId"],
            ),
        ),
        (
            "a cluster without etcd or Redis",
            (
                vec!["replicas=3"],
                vec!["replicas=3", "cluster", "etcd", "Redis"],
            ),
        ),
        (
            "autoscaling without etcd or Redis",
            (
                vec!["autoscaling.enabled=true"],
                vec!["autoscaling.enabled", "etcd", "Redis"],
            ),
        ),
        (
            "a grace period shorter than preStop and drain",
            (
                vec!["terminationGracePeriodSeconds=15"],
                vec!["terminationGracePeriodSeconds=15", "drainTimeoutSecs"],
            ),
        ),
        (
            "an HTTP domain without a Secret",
            (
                vec!["domains[0].name=a.example", "domains[0].platform=http"],
                vec!["a.example", "existingSecret"],
            ),
        ),
        (
            "https:// etcd endpoints without a TLS Secret",
            (
                vec!["externalEtcd.endpoints={https://etcd-0:2379,https://etcd-1:2379}"],
                vec![
                    "externalEtcd.endpoints",
                    "https://",
                    "externalEtcd.tls.existingSecret",
                ],
            ),
        ),
        (
            "etcd endpoints mixing http:// and https://",
            (
                vec![
                    "externalEtcd.endpoints={https://etcd-0:2379,http://etcd-1:2379}",
                    "externalEtcd.tls.existingSecret=etcd-tls",
                ],
                vec![
                    "externalEtcd.endpoints",
                    "http://etcd-1:2379",
                    "all https://",
                ],
            ),
        ),
        (
            "an etcd TLS Secret with http:// endpoints",
            (
                vec![
                    "externalEtcd.endpoints={http://etcd-0:2379}",
                    "externalEtcd.tls.existingSecret=etcd-tls",
                ],
                vec!["externalEtcd.tls.existingSecret=etcd-tls", "https://"],
            ),
        ),
        (
            "an etcd endpoint without a port",
            (
                vec!["externalEtcd.endpoints={https://etcd-0}"],
                vec!["externalEtcd.endpoints.0"],
            ),
        ),
        (
            "a Redis TLS Secret with a redis:// URL",
            (
                vec![
                    "externalRedis.url=redis://redis:6379",
                    "externalRedis.tls.existingSecret=redis-tls",
                ],
                vec![
                    "externalRedis.tls.existingSecret=redis-tls",
                    "externalRedis.url",
                    "rediss://",
                ],
            ),
        ),
        (
            "a Redis TLS Secret with the in-chart Redis",
            (
                vec![
                    "redis.enabled=true",
                    "externalRedis.tls.existingSecret=redis-tls",
                ],
                vec!["externalRedis.tls.existingSecret", "rediss://"],
            ),
        ),
        (
            "a Redis client certificate without a Secret",
            (
                vec![
                    "externalRedis.url=rediss://redis:6380",
                    "externalRedis.tls.clientCert=true",
                ],
                vec![
                    "externalRedis.tls.clientCert",
                    "externalRedis.tls.existingSecret",
                ],
            ),
        ),
        (
            "a cluster without mTLS or allowPlaintext",
            (
                vec!["replicas=2", "etcd.enabled=true", "redis.enabled=true"],
                vec!["cluster.tls.existingSecret", "cluster.allowPlaintext"],
            ),
        ),
    ]);
    for (what, (sets, words)) in cases {
        match template(None, &sets)? {
            Ok(_) => bail!("{what} ({sets:?}) rendered"),
            Err(e) => {
                for w in words {
                    ensure!(e.contains(w), "{what}: the error does not name {w}:\n{e}");
                }
            }
        }
    }
    // The same values with what they lack render.
    for sets in [
        vec![
            "replicas=3",
            "etcd.enabled=true",
            "redis.enabled=true",
            "cluster.allowPlaintext=true",
        ],
        vec!["terminationGracePeriodSeconds=30"],
        vec!["replicas=1", "store.backend=memory"],
        // TLS to Redis with the system's roots needs no Secret; https:// etcd with its CA.
        vec!["externalRedis.url=rediss://redis:6380"],
        vec![
            "externalEtcd.endpoints={https://etcd-0:2379,https://etcd-1:2379}",
            "externalEtcd.tls.existingSecret=etcd-tls",
        ],
        // A single node may do without a dialback secret (a random one per process); a cluster
        // with one renders.
        vec![
            "xmpp.enabled=true",
            "xmpp.tls.secretName=xmpp-tls",
            "domains[0].name=jabber.example",
            "domains[0].platform=xmpp",
        ],
        vec![
            "xmpp.enabled=true",
            "xmpp.tls.secretName=xmpp-tls",
            "xmpp.dialbackSecret.secretName=xmpp-dialback",
            "replicas=3",
            "etcd.enabled=true",
            "redis.enabled=true",
            "cluster.allowPlaintext=true",
        ],
        // SIP on TLS with its certificate and name; without TLS, no certificate is needed; a
        // peer on UDP with its listener on, digest credentials complete.
        vec![
            "sip.enabled=true",
            "sip.host=sip.contoso.example",
            "sip.tls.secretName=sip-tls",
            "domains[0].name=sfb.example",
            "domains[0].platform=sip",
            "sip.peers[0].domain=sfb.example",
        ],
        vec![
            "sip.enabled=true",
            "sip.host=sip.contoso.example",
            "sip.tls.enabled=false",
            "sip.udp.enabled=true",
            "domains[0].name=sfb.example",
            "domains[0].platform=sip",
            "sip.peers[0].domain=sfb.example",
            "sip.peers[0].transport=udp",
            "sip.peers[0].username=fedrelay",
            "sip.peers[0].passwordSecret.secretName=sip-peers",
        ],
        // The management API on the pods' address with TLS, or in plain HTTP when allowed; on
        // loopback (the default) without either; OIDC with issuer and audience; off, nothing
        // of it is checked.
        vec!["api.exposure=service", "api.tls.secretName=api-tls"],
        vec!["api.exposure=service", "api.allowPlaintext=true"],
        vec![
            "api.oidc.issuer=https://sso.contoso.example/realms/corp",
            "api.oidc.audience=urn:fedrelay:api",
            "api.bootstrapToken.secretName=api-bootstrap",
        ],
        vec!["api.enabled=false", "api.exposure=service", "api.port=9090"],
    ] {
        if let Err(e) = template(None, &sets)? {
            bail!("{sets:?} did not render:\n{e}");
        }
    }
    Ok(())
}

/// docs/operations.md explains every metric the relay exports and every alert of the chart.
#[test]
fn the_operations_doc_explains_every_metric_and_alert() -> Result<()> {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md"))?;
    let missing: Vec<String> = exported_metric_names()?
        .into_iter()
        .filter(|m| !doc.contains(&format!("`{m}`")))
        .collect();
    ensure!(
        missing.is_empty(),
        "docs/operations.md does not explain {missing:?}"
    );
    let docs = render(
        "ci/production-external.yaml",
        Some(&chart().join("ci/production-external.yaml")),
    )?;
    let teams = render("ci/teams.yaml", Some(&chart().join("ci/teams.yaml")))?;
    let xmpp = render("ci/xmpp.yaml", Some(&chart().join("ci/xmpp.yaml")))?;
    let sip = render("ci/sip.yaml", Some(&chart().join("ci/sip.yaml")))?;
    let mut alerts = BTreeSet::new();
    for d in docs
        .iter()
        .chain(&teams)
        .chain(&xmpp)
        .chain(&sip)
        .filter(|d| kind(d) == "PrometheusRule")
    {
        for g in d["spec"]["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                if let Some(a) = r["alert"].as_str() {
                    alerts.insert(a.to_string());
                }
            }
        }
    }
    ensure!(alerts.len() >= 15, "only {} alerts rendered", alerts.len());
    let missing: Vec<&String> = alerts
        .iter()
        .filter(|a| !doc.contains(&format!("`{a}`")))
        .collect();
    ensure!(
        missing.is_empty(),
        "docs/operations.md does not explain the alerts {missing:?}"
    );
    Ok(())
}

/// The loadtest Job's command line is one the harness accepts: run with it (the relay config
/// path it names exists only in the pod), the harness gets past parsing its flags and fails
/// on that file, not on a flag.
#[test]
fn the_loadtest_job_runs_a_command_line_the_harness_accepts() -> Result<()> {
    let values = chart().join("ci").join("production-external.yaml");
    let docs = render("production-external", Some(&values))?;
    let job = docs
        .iter()
        .find(|d| kind(d) == "Job")
        .context("no loadtest Job rendered")?;
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    ensure!(
        container["command"][0] == "/usr/local/bin/relay-loadtest",
        "{}",
        container["command"]
    );
    let args: Vec<String> = container["args"]
        .as_array()
        .context("no args")?
        .iter()
        .map(|a| {
            a.as_str()
                .map(str::to_owned)
                .context("an arg is not a string")
        })
        .collect::<Result<_>>()?;
    ensure!(
        args.iter().any(|a| a == "/etc/fedrelay/relay.toml"),
        "{args:?}"
    );
    // The edge speaks HTTPS there: the Job trusts the CA from the Secret it mounts.
    let ca = args
        .iter()
        .position(|a| a == "--tls-ca")
        .and_then(|i| args.get(i + 1))
        .context("an https target without --tls-ca")?;
    ensure!(args.iter().any(|a| a.starts_with("https://")), "{args:?}");
    let mounts = container["volumeMounts"].to_string();
    ensure!(
        ca.starts_with("/etc/fedrelay/loadtest-ca/")
            && mounts.contains("/etc/fedrelay/loadtest-ca"),
        "{ca} {mounts}"
    );
    let out = Command::new(test_support::workspace_binary("relay-loadtest")?)
        .args(&args)
        .output()
        .context("running relay-loadtest")?;
    let err = output_text(&out);
    ensure!(out.status.code() == Some(2), "{err}");
    ensure!(
        !err.contains("unexpected argument") && !err.contains("Usage:"),
        "the harness refused the Job's flags: {args:?}\n{err}"
    );
    ensure!(err.contains("/etc/fedrelay/relay.toml"), "{err}");
    Ok(())
}
