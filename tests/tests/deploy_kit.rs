//! The deploy kit under `deploy/`: everything about it that can be checked without
//! systemd running or a Docker engine.
//!
//! * `promtool check config|rules` and `promtool test rules` on `deploy/prometheus/`.
//! * The Grafana dashboard parses, is laid out sanely, and queries only metrics that the
//!   metrics contract (METRICS.md) lists; so do the alert rules.
//! * The systemd unit has the options the docs promise (and `systemd-analyze verify`
//!   accepts it, where that tool works).
//! * The Docker kit's files exist, its shardgate config passes `shardgate check-config`.
//! * A real Prometheus server (Debian package `prometheus`), configured from the shipped
//!   `prometheus.yml` and `alerts.yml`, scrapes a running shardgate after a pgbench run:
//!   `up == 1`, query counters above 0, reads or writes routed on every configured shard,
//!   every alert rule evaluates cleanly and every dashboard query is valid PromQL.
//! * `promtool check metrics` accepts shardgate's `/metrics` text.
//!
//! Run with `./tests/run.sh --test deploy_kit` (it installs `prometheus` and starts the
//! cluster). Where `promtool`/`prometheus` are missing, the tests that need them print a
//! note and pass.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use shardgate_e2e::{
    connect, free_port, http_get, pgbench, skip_in_direct_mode, unique_name, wait_for, Proxy,
    ScratchDir,
};

// --- files of the kit ------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo_root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The metrics contract. `SHARDGATE_METRICS_MD` wins; then the repository's `docs/` and
/// root; then the team notes next to the repository.
fn metrics_md() -> (PathBuf, String) {
    let root = repo_root();
    let mut candidates: Vec<PathBuf> = std::env::var_os("SHARDGATE_METRICS_MD")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(root.join("docs/METRICS.md"));
    candidates.push(root.join("METRICS.md"));
    candidates.push(root.join("../notes/METRICS.md"));
    for c in &candidates {
        if let Ok(text) = std::fs::read_to_string(c) {
            return (c.clone(), text);
        }
    }
    panic!("METRICS.md (the metrics contract) not found; looked at {candidates:?}; set SHARDGATE_METRICS_MD")
}

// --- metric names ------------------------------------------------------------------------

/// Every `shardgate_*` identifier in a text.
fn shardgate_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("shardgate_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The names METRICS.md lists, and which of them are histograms.
struct Contract {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

impl Contract {
    fn parse(text: &str) -> Contract {
        let mut names = BTreeSet::new();
        let mut histograms = BTreeSet::new();
        for line in text.lines() {
            let on_line = shardgate_names(line);
            if line.contains("histogram") {
                histograms.extend(on_line.iter().cloned());
            }
            names.extend(on_line);
        }
        Contract { names, histograms }
    }

    /// Whether a name used in a query is a listed metric (or a series of a listed
    /// histogram: `_bucket`, `_sum`, `_count`).
    fn knows(&self, name: &str) -> bool {
        if self.names.contains(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| self.histograms.contains(base))
        })
    }

    fn unknown<'a>(&self, used: &'a BTreeSet<String>) -> Vec<&'a String> {
        used.iter().filter(|n| !self.knows(n)).collect()
    }
}

// --- the dashboard -------------------------------------------------------------------------

fn dashboard() -> Value {
    let path = deploy("grafana/shardgate.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// Every panel, rows and the panels of collapsed rows included.
fn all_panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// (panel title, PromQL) of every query target.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for p in all_panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    exprs
}

/// Every string anywhere in a JSON value.
fn json_strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

/// A dashboard query as Prometheus sees it: the Grafana variables replaced by what they
/// are with every option selected.
fn expand_grafana_vars(expr: &str, job: &str) -> String {
    let expanded = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$job", job)
        .replace("$instance", ".*")
        .replace("$shard", ".*");
    assert!(
        !expanded.contains('$'),
        "a dashboard query uses a variable this test does not know: {expr}"
    );
    expanded
}

#[test]
fn dashboard_is_valid_and_uses_only_contract_metrics() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion should be a recent one (~39): {}",
        dash["schemaVersion"]
    );
    assert!(
        dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "dashboard uid"
    );
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard title"
    );

    // The data source variable every panel and query variable refers to.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "DS_PROMETHEUS"),
        "no datasource variable DS_PROMETHEUS"
    );
    let ds_ok = |ds: &Value| ds["type"] == "prometheus" && ds["uid"] == "${DS_PROMETHEUS}";
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(
            ds_ok(&v["datasource"]),
            "variable {} data source",
            v["name"]
        );
    }

    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in all_panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?}: no id"));
        assert!(ids.insert(id), "panel id {id} used twice ({title:?})");
        let pos = &p["gridPos"];
        let (x, w, h) = (pos["x"].as_u64(), pos["w"].as_u64(), pos["h"].as_u64());
        assert!(
            matches!((x, w, h), (Some(x), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24)
                && pos["y"].is_u64(),
            "panel {title:?}: bad gridPos {pos}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            ds_ok(&p["datasource"]),
            "panel {title:?}: data source {}",
            p["datasource"]
        );
        let targets = p["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
        for t in targets.into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "panel {title:?}: empty query");
            assert!(
                ds_ok(&t["datasource"]),
                "panel {title:?}: query data source"
            );
            assert!(
                t["refId"].is_string(),
                "panel {title:?}: query without refId"
            );
            // Balanced brackets: a cheap guard against a broken edit (the Prometheus test
            // below runs every query for real).
            for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
                assert_eq!(
                    expr.matches(open).count(),
                    expr.matches(close).count(),
                    "panel {title:?}: unbalanced {open}{close} in {expr}"
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "only {queries} queries in the dashboard");

    // Every metric named anywhere in the dashboard (queries, variables, descriptions) is
    // in the contract, and the panels the kit promises are there.
    let mut strings = Vec::new();
    json_strings(&dash, &mut strings);
    let used: BTreeSet<String> = strings.iter().flat_map(|s| shardgate_names(s)).collect();
    let (md_path, md) = metrics_md();
    let contract = Contract::parse(&md);
    let unknown = contract.unknown(&used);
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics that {} does not list: {unknown:?}",
        md_path.display()
    );
    let exprs: String = dashboard_exprs(&dash)
        .into_iter()
        .map(|(_, e)| e + "\n")
        .collect();
    for needed in [
        "shardgate_transactions_total",
        "shardgate_queries_total",
        "shardgate_pool_checkouts_total",
        "shardgate_server_connections_opened_total",
        "shardgate_query_duration_seconds_bucket",
        "shardgate_pool_active_connections",
        "shardgate_pool_idle_connections",
        "shardgate_pool_waiting_clients",
        "shardgate_pool_size",
        "shardgate_replica_lag_bytes",
        "shardgate_replica_lag_seconds",
        "shardgate_host_up",
        "shardgate_host_primary",
        "shardgate_failovers_total",
        "shardgate_shardmap_version",
        "shardgate_shard_load",
        "shardgate_shard_load_ratio",
        "shardgate_moves_started_total",
        "shardgate_moves_completed_total",
        "shardgate_moves_failed_total",
        "shardgate_move_rows_copied_total",
        "shardgate_move_pause_seconds_bucket",
    ] {
        assert!(exprs.contains(needed), "no dashboard query uses {needed}");
    }
    assert!(
        exprs.contains("histogram_quantile(0.5") && exprs.contains("histogram_quantile(0.99"),
        "the dashboard should show p50 and p99 latency"
    );
}

#[test]
fn alert_rules_use_only_contract_metrics() {
    let (md_path, md) = metrics_md();
    let contract = Contract::parse(&md);
    let rules = read(&deploy("prometheus/alerts.yml"));
    // Names in expressions and annotations (comments may cite anything).
    let text: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let used = shardgate_names(&text);
    assert!(!used.is_empty(), "alerts.yml queries no shardgate metric");
    let unknown = contract.unknown(&used);
    assert!(
        unknown.is_empty(),
        "alerts.yml uses metrics that {} does not list: {unknown:?}",
        md_path.display()
    );
    for alert in [
        "HotShard",
        "ReplicaLagHigh",
        "PoolSaturated",
        "PrimaryDown",
        "ShardgateDown",
        "ShardgateShardHot",
        "ShardgateSlotMoveFailed",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "alerts.yml has no alert {alert}"
        );
    }
}

#[test]
fn contract_parser_handles_histograms() {
    let md = "- shardgate_a_total (counter)\n\
              - shardgate_b_seconds{shard} (histogram)\n\
              - shardgate_c, shardgate_d (gauges)\n";
    let c = Contract::parse(md);
    let used = shardgate_names(
        "sum(rate(shardgate_b_seconds_bucket[1m])) + shardgate_c + shardgate_c_bucket \
         + shardgate_a_total_sum + xshardgate_x + shardgate_d",
    );
    assert_eq!(
        c.unknown(&used),
        vec!["shardgate_a_total_sum", "shardgate_c_bucket"]
    );
}

// --- tools ---------------------------------------------------------------------------------

/// An executable named `name` on PATH or in /usr/bin (the Debian package's place).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        eprintln!(
            "{test}: skipped: `{name}` is not installed (Debian package `prometheus`; \
             tests/run.sh installs it)"
        );
    }
    found
}

/// Runs a command to the end (stdin from `input`), returning (success, stdout+stderr).
fn run_cmd(cmd: &mut Command, input: Option<&[u8]>) -> (bool, String) {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_config_and_rules() {
    let Some(promtool) = tool_or_skip("promtool", "promtool_accepts_config_and_rules") else {
        return;
    };
    let dir = deploy("prometheus");
    for args in [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let (ok, out) = run_cmd(Command::new(&promtool).args(args).current_dir(&dir), None);
        assert!(ok, "promtool {} failed:\n{out}", args.join(" "));
    }
}

// --- systemd ---------------------------------------------------------------------------------

/// `Key=value` settings of a unit file, per key in order (a key may repeat).
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            map.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    map
}

#[test]
fn systemd_unit_has_the_promised_options() {
    let path = deploy("systemd/shardgate.service");
    let text = read(&path);
    let s = unit_settings(&text);
    let one = |k: &str| -> &str {
        match s.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{k}: expected one setting, found {other:?}"),
        }
    };
    assert!(
        ["simple", "notify", "exec"].contains(&one("Type")),
        "Type={}",
        one("Type")
    );
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/shardgate --config /etc/shardgate/shardgate.toml"
    );
    assert_eq!(
        s["ExecReload"].last().map(String::as_str),
        Some("/bin/kill -HUP $MAINPID"),
        "reload must end in SIGHUP"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("LimitNOFILE"), "65536");
    assert!(s.contains_key("TimeoutStopSec"));
    assert_eq!(one("CapabilityBoundingSet"), "", "no capabilities");
    assert!(
        s.contains_key("DynamicUser") || s.contains_key("User"),
        "runs as an unprivileged user"
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("ReadWritePaths", "/var/lib/shardgate"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }

    // systemd-analyze verify, with the binary it names pointing at the one just built.
    let (Some(analyze), Ok(bin)) = (find_tool("systemd-analyze"), std::env::var("SHARDGATE_BIN"))
    else {
        eprintln!("systemd_unit_has_the_promised_options: systemd-analyze verify skipped (no systemd-analyze or SHARDGATE_BIN)");
        return;
    };
    let dir = ScratchDir::new("systemd");
    let unit = dir.path().join("shardgate.service");
    std::fs::write(&unit, text.replace("/usr/local/bin/shardgate", &bin)).unwrap();
    let (ok, out) = run_cmd(
        Command::new(analyze)
            .arg("verify")
            .arg(&unit)
            .env("SYSTEMD_LOG_COLOR", "0"),
        None,
    );
    // Only what it says about this unit counts (the host's own units are not ours).
    let ours: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("shardgate.service"))
        .collect();
    assert!(
        ok && ours.is_empty(),
        "systemd-analyze verify {}:\n{out}",
        unit.display()
    );
}

// --- Docker ------------------------------------------------------------------------------------

#[test]
fn docker_kit_is_consistent() {
    let dir = deploy("docker");
    let dockerfile = read(&dir.join("Dockerfile"));
    let compose = read(&dir.join("compose.yaml"));

    // Multi-stage, non-root, the ports, a health check on /health of the metrics port.
    assert!(dockerfile.contains("FROM rust:1-bookworm AS build"));
    assert!(dockerfile.contains("FROM debian:bookworm-slim"));
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "USER {user}"
    );
    assert!(dockerfile.contains("EXPOSE 6432 9930"));
    let healthcheck = healthcheck_command(&dockerfile).join(" ");
    assert!(
        healthcheck.contains("/health") && healthcheck.contains("/9930"),
        "HEALTHCHECK {healthcheck}"
    );

    // Files the Dockerfile copies (context: the repository root) and the compose file
    // mounts (relative to deploy/docker) exist.
    for line in dockerfile.lines() {
        if let Some(rest) = line.strip_prefix("COPY ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            if parts[0].starts_with("--from") || parts[0] == "." {
                continue;
            }
            let src = repo_root().join(parts[0]);
            assert!(
                src.exists(),
                "Dockerfile copies {} (missing)",
                src.display()
            );
        }
    }
    // The build stage runs the profile-guided build (whose training workload
    // `pgo_training_workload_runs` checks).
    assert!(dockerfile.contains("deploy/pgo/build.sh --out /out/shardgate"));
    let mut mounts = 0;
    for line in compose.lines() {
        let line = line.trim();
        let Some(spec) = line.strip_prefix("- ") else {
            continue;
        };
        if !(spec.starts_with("./") || spec.starts_with("../")) {
            continue;
        }
        let src = spec.split(':').next().unwrap();
        assert!(
            dir.join(src).exists(),
            "compose.yaml mounts {src} (missing)"
        );
        mounts += 1;
    }
    assert!(
        mounts >= 5,
        "expected the kit's bind mounts in compose.yaml"
    );
    for service in [
        "primary:",
        "replica:",
        "shardgate:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}\n")),
            "compose.yaml has no service {service}"
        );
    }
    assert!(
        read(&dir.join("replica-entrypoint.sh")).contains("pg_basebackup"),
        "the replica clones the primary with pg_basebackup"
    );

    // The config baked into the image is valid, and listens where the image says.
    let toml = dir.join("shardgate.toml");
    let config = read(&toml);
    assert!(config.contains("listen = \"0.0.0.0:6432\""));
    assert!(config.contains("metrics_listen = \"0.0.0.0:9930\""));
    let Ok(bin) = std::env::var("SHARDGATE_BIN") else {
        eprintln!("docker_kit_is_consistent: check-config skipped (SHARDGATE_BIN not set)");
        return;
    };
    let (ok, out) = run_cmd(Command::new(bin).arg("check-config").arg(&toml), None);
    assert!(ok, "shardgate check-config {}:\n{out}", toml.display());
}

/// The training workload of the profile-guided build (`deploy/pgo/build.sh`, which the
/// container image and the benchmark use) runs against this binary: a throwaway cluster,
/// every pgbench run of a pooled and a sharded database with no failed transaction. A
/// statement the router stopped accepting would otherwise first break an image build.
#[test]
fn pgo_training_workload_runs() {
    let script = repo_root().join("deploy/pgo/build.sh");
    let (ok, out) = run_cmd(Command::new(&script).arg("--no-such-option"), None);
    assert!(
        !ok && out.contains("unknown argument --no-such-option"),
        "{out}"
    );
    let Ok(bin) = std::env::var("SHARDGATE_BIN") else {
        eprintln!("pgo_training_workload_runs: skipped (SHARDGATE_BIN not set)");
        return;
    };
    // Ports 29532-29534 (servers) and 29542 (shardgate): used by no other test.
    let (ok, out) = run_cmd(
        Command::new(&script)
            .args(["--check", &bin])
            .env("SHARDGATE_PGO_PORT", "29532"),
        None,
    );
    assert!(ok, "deploy/pgo/build.sh --check {bin}:\n{out}");
    for run in [
        "pooled pgbench -c 16 -T 1 -S -M extended",
        "pooled pgbench -c 8 -T 1 -M prepared",
        "sharded pgbench -c 16 -T 1 -M simple",
        "sharded pgbench -c 4 -T 1 -M extended",
        "check passed",
    ] {
        assert!(out.contains(run), "no '{run}' in:\n{out}");
    }
}

/// The argv of the Dockerfile's `HEALTHCHECK ... CMD [...]` (exec form).
fn healthcheck_command(dockerfile: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("the Dockerfile has a HEALTHCHECK");
    let json = line
        .split_once(" CMD ")
        .map(|(_, cmd)| cmd.trim())
        .expect("HEALTHCHECK ... CMD [...]");
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("HEALTHCHECK CMD is not JSON: {e}: {json}"))
}

// --- a real Prometheus -------------------------------------------------------------------

/// A Prometheus server for one test, killed (by PID) on drop.
struct Prometheus {
    child: Mutex<Child>,
    port: u16,
    dir: ScratchDir,
}

impl Prometheus {
    /// Starts `bin` with `config` (written into a scratch directory together with
    /// `extra_files`) on a free loopback port.
    fn start(bin: &Path, config: &str, extra_files: &[(&str, String)]) -> Prometheus {
        let dir = ScratchDir::new("prometheus");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        for (name, text) in extra_files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Prometheus {
            child: Mutex::new(child),
            port,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn exited(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten().is_some()
    }

    /// GET an API path; the parsed `data` of a successful answer, or the error text.
    async fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.port, path_and_query)
            .await
            .map_err(|e| format!("GET {path_and_query}: {e}"))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET {path_and_query}: HTTP {status}, not JSON ({e}): {body}"))?;
        if status == 200 && v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("GET {path_and_query}: HTTP {status}: {body}"))
        }
    }

    /// An instant query: (labels, value) per series.
    async fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>, String> {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await?;
        let mut out = Vec::new();
        let result = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
            other => return Err(format!("{promql}: unexpected result type {other:?}")),
        };
        for series in result {
            let labels = series["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let value = series["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| format!("{promql}: bad sample {series}"))?;
            out.push((labels, value));
        }
        Ok(out)
    }

    /// Sum of an instant query's values, None while it returns nothing.
    async fn sum(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await.ok()?;
        (!r.is_empty()).then(|| r.iter().map(|(_, v)| v).sum())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let mut cut = log.len().saturating_sub(16 * 1024);
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            let tail = &log[cut..];
            eprintln!(
                "===== prometheus on port {} log (tail) =====\n{tail}",
                self.port
            );
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The scrape job name of the shipped prometheus.yml.
const JOB: &str = "shardgate";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_shardgate() {
    const TEST: &str = "prometheus_scrapes_shardgate";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let Some(prometheus_bin) = tool_or_skip("prometheus", TEST) else {
        return;
    };

    // shardgate with replicas and metrics over every shard of the cluster; the pgbench
    // table is sharded by id, so every shard gets traffic.
    let table = unique_name("deploy_kit");
    let proxy = Proxy::builder()
        .metrics()
        .replicas()
        .all_shards()
        .raw_toml(&format!(
            "[[databases.sharded_tables]]\nname = \"{table}\"\ncolumn = \"id\"\ntype = \"bigint\""
        ))
        .start()
        .await;
    let mport = proxy.metrics_port().expect("metrics port");
    let shards = proxy.config().matches("[[databases.shards]]").count();
    assert!(shards >= 1, "no shard in the config:\n{}", proxy.config());

    // Prometheus configured from the shipped files: the target is this shardgate, and
    // the intervals are shorter so that the test does not wait for 5 s scrapes.
    let shipped = read(&deploy("prometheus/prometheus.yml"));
    let target = format!("127.0.0.1:{mport}");
    let config = shipped
        .replace("shardgate:9930", &target)
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("scrape_timeout: 5s", "scrape_timeout: 1s")
        .replace("evaluation_interval: 5s", "evaluation_interval: 1s");
    assert!(
        config.contains(&target) && config.contains("scrape_interval: 1s"),
        "prometheus.yml no longer has the target shardgate:9930 and a 5s scrape_interval \
         this test rewrites:\n{shipped}"
    );
    let prom = Prometheus::start(
        &prometheus_bin,
        &config,
        &[("alerts.yml", read(&deploy("prometheus/alerts.yml")))],
    );
    wait_for(
        "Prometheus to be ready",
        Duration::from_secs(60),
        || async {
            assert!(!prom.exited(), "prometheus exited:\n{}", prom.log());
            let (status, _) = http_get(prom.port, "/-/ready").await.ok()?;
            (status == 200).then_some(())
        },
    )
    .await;

    // A pgbench run through shardgate: reads and writes.
    let client = connect(&proxy.url())
        .await
        .expect("connect through shardgate");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint, at timestamptz DEFAULT now())"
        ))
        .await
        .unwrap();
    let scratch = ScratchDir::new("pgbench");
    let script = scratch.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, 1000000)\n\
             INSERT INTO {table} (id) VALUES (:id);\n\
             SELECT count(*) FROM {table} WHERE id = :id;\n\
             SELECT :id;\n"
        ),
    )
    .unwrap();
    let args: Vec<String> = ["-n", "-c", "4", "-j", "2", "-t", "50", "-h", "127.0.0.1"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-p".into(),
            proxy.port().to_string(),
            "-U".into(),
            "app".into(),
            "-f".into(),
            script.display().to_string(),
            "app".into(),
        ])
        .collect();
    let out = pgbench(&args, "app").await;
    out.assert_success("pgbench through shardgate");
    assert!(
        out.stdout.contains("actually processed: 200/200"),
        "pgbench did not run every transaction:\n{}",
        out.stdout
    );

    // Prometheus sees shardgate up, and counters that moved.
    let up = format!("up{{job=\"{JOB}\"}}");
    wait_for(
        "Prometheus to scrape shardgate (up == 1)",
        Duration::from_secs(60),
        || async { (prom.sum(&up).await? == 1.0).then_some(()) },
    )
    .await;
    wait_for(
        "shardgate_queries_total > 0 in Prometheus",
        Duration::from_secs(60),
        || async {
            let q = format!("sum(shardgate_queries_total{{job=\"{JOB}\"}})");
            (prom.sum(&q).await? > 0.0).then_some(())
        },
    )
    .await;

    // Every configured shard: reads or writes routed to it, a primary, hosts up, and
    // queries counted.
    for shard in 0..shards {
        let s = shard.to_string();
        let what = format!("reads or writes routed on shard {s}");
        wait_for(&what, Duration::from_secs(30), || async {
            let writes = prom
                .sum(&format!(
                    "sum(shardgate_writes_routed_total{{job=\"{JOB}\",shard=\"{s}\"}})"
                ))
                .await
                .unwrap_or(0.0);
            let reads = prom
                .sum(&format!(
                    "sum(shardgate_reads_routed_total{{job=\"{JOB}\",shard=\"{s}\"}})"
                ))
                .await
                .unwrap_or(0.0);
            (writes + reads > 0.0).then_some(())
        })
        .await;
        let what = format!("shard {s} to have a primary and every host up");
        wait_for(&what, Duration::from_secs(30), || async {
            let primary = prom
                .sum(&format!(
                    "min(shardgate_shard_has_primary{{job=\"{JOB}\",shard=\"{s}\"}})"
                ))
                .await?;
            let down = prom
                .sum(&format!(
                    "count(shardgate_host_up{{job=\"{JOB}\",shard=\"{s}\"}} == 0) or vector(0)"
                ))
                .await?;
            (primary == 1.0 && down == 0.0).then_some(())
        })
        .await;
    }
    assert!(
        shards >= 2,
        "the test covers several shards:\n{}",
        proxy.config()
    );
    // A scrape taken after the pgbench run counts every shard's queries.
    wait_for(
        "shardgate_queries_total > 0 for every shard",
        Duration::from_secs(60),
        || async {
            let per_shard = prom
                .query(&format!(
                    "sum by (shard) (shardgate_queries_total{{job=\"{JOB}\"}})"
                ))
                .await
                .ok()?;
            (0..shards)
                .all(|shard| {
                    let s = shard.to_string();
                    per_shard
                        .iter()
                        .any(|(l, v)| l.get("shard") == Some(&s) && *v > 0.0)
                })
                .then_some(())
        },
    )
    .await;

    // Every alert rule loaded and evaluates without errors against the real series.
    wait_for(
        "every alert rule to be evaluated cleanly",
        Duration::from_secs(30),
        || async {
            let data = prom.api("/api/v1/rules").await.ok()?;
            let rules: Vec<&Value> = data["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            for r in &rules {
                let err = r["lastError"].as_str().unwrap_or("");
                assert!(err.is_empty(), "rule {} failed: {err}", r["name"]);
            }
            let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
            for alert in [
                "HotShard",
                "ReplicaLagHigh",
                "PoolSaturated",
                "PrimaryDown",
                "ShardgateDown",
                "ShardgateShardHot",
                "ShardgateSlotMoveFailed",
            ] {
                assert!(names.contains(alert), "rule {alert} not loaded: {names:?}");
            }
            rules.iter().all(|r| r["health"] == "ok").then_some(())
        },
    )
    .await;
    // And none fires against a healthy cluster.
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").await.unwrap();
    assert!(firing.is_empty(), "alerts firing: {firing:?}");

    // Every dashboard query is valid PromQL; those over metrics shardgate already exports
    // return series.
    let (_, exposition) = http_get(mport, "/metrics").await.expect("GET /metrics");
    let exported = shardgate_names(
        &exposition
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    // rate() needs two samples in its window: wait for a few scrapes after the run.
    wait_for(
        "three scrapes after the run",
        Duration::from_secs(30),
        || async {
            let q = format!("count_over_time(up{{job=\"{JOB}\"}}[1m])");
            (prom.sum(&q).await? >= 3.0).then_some(())
        },
    )
    .await;
    let mut empty = Vec::new();
    for (title, expr) in dashboard_exprs(&dashboard()) {
        let promql = expand_grafana_vars(&expr, JOB);
        let result = prom
            .query(&promql)
            .await
            .unwrap_or_else(|e| panic!("dashboard panel {title:?}: query rejected: {e}"));
        let names = shardgate_names(&promql);
        if !names.is_empty() && names.iter().all(|n| exported.contains(n)) && result.is_empty() {
            empty.push(format!("{title}: {promql}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries over exported metrics returned nothing:\n{}",
        empty.join("\n")
    );

    // The Docker image's health check command works against a live metrics port.
    check_docker_healthcheck(mport).await;

    let _ = client.batch_execute(&format!("DROP TABLE {table}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_accepts_exposition() {
    const TEST: &str = "promtool_check_metrics_accepts_exposition";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let Some(promtool) = tool_or_skip("promtool", TEST) else {
        return;
    };
    // Some traffic first, so that every lazily created series is there too.
    let proxy = Proxy::builder().metrics().replicas().start().await;
    let mport = proxy.metrics_port().expect("metrics port");
    let client = connect(&proxy.url())
        .await
        .expect("connect through shardgate");
    client
        .batch_execute("SELECT 1; BEGIN; SELECT 2; COMMIT")
        .await
        .unwrap();
    let exposition = wait_for(
        "/metrics to count the queries",
        Duration::from_secs(10),
        || async {
            let (status, body) = http_get(mport, "/metrics").await.ok()?;
            (status == 200 && body.contains("shardgate_queries_total")).then_some(body)
        },
    )
    .await;
    let (ok, out) = run_cmd(
        Command::new(promtool).args(["check", "metrics"]),
        Some(exposition.as_bytes()),
    );
    assert!(
        ok,
        "promtool check metrics rejects shardgate's /metrics (\"no help text\": describe \
         the metric with metrics::describe_counter!/describe_gauge!/describe_histogram!):\n\
         {out}\n--- /metrics:\n{exposition}"
    );
}

/// Runs the Dockerfile's HEALTHCHECK command with its port pointed at `mport`. While
/// shardgate has no `/health` yet, the same command is run against `/metrics`, which
/// checks its HTTP mechanics.
async fn check_docker_healthcheck(mport: u16) {
    let argv = healthcheck_command(&read(&deploy("docker/Dockerfile")));
    let has_health = matches!(http_get(mport, "/health").await, Ok((200, _)));
    let argv: Vec<String> = argv
        .iter()
        .map(|a| {
            let a = a.replace("/9930", &format!("/{mport}"));
            if has_health {
                a
            } else {
                a.replace("/health", "/metrics")
            }
        })
        .collect();
    if !has_health {
        eprintln!("prometheus_scrapes_shardgate: shardgate serves no /health yet: the Docker health check ran against /metrics");
    }
    let (ok, out) = run_cmd(Command::new(&argv[0]).args(&argv[1..]), None);
    assert!(ok, "the Docker HEALTHCHECK command failed: {argv:?}\n{out}");
    // And it fails when nothing listens.
    let dead = free_port();
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.replace(&format!("/{mport}"), &format!("/{dead}")))
        .collect();
    let (ok, _) = run_cmd(Command::new(&argv[0]).args(&argv[1..]), None);
    assert!(
        !ok,
        "the Docker HEALTHCHECK command passed with nothing listening"
    );
}
