//! The documents that describe the catalog stay true to it.

use std::collections::HashSet;
use std::path::PathBuf;

use brisk_metrics::catalog::{CATALOG, markdown_table};

fn doc(name: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// `docs/metrics.md` holds exactly the generated table. Run with `BRISK_BLESS=1` to rewrite it.
#[test]
fn metrics_md_shows_the_catalog() {
    let (path, text) = doc("metrics.md");
    let (start, end) = ("<!-- catalog:start -->\n", "<!-- catalog:end -->");
    let from = text.find(start).expect("start marker") + start.len();
    let to = text.find(end).expect("end marker");
    let expected = markdown_table();
    if text[from..to] != expected {
        if std::env::var_os("BRISK_BLESS").is_some() {
            let updated = format!("{}{expected}{}", &text[..from], &text[to..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!("docs/metrics.md is stale; run with BRISK_BLESS=1. Expected:\n{expected}");
        }
    }
}

/// Every metric a PromQL expression mentions, with `_bucket`/`_count`/`_sum` taken off.
/// Label names and recorded series (which contain `:`) are returned apart.
fn metric_names(expr: &str) -> (Vec<String>, Vec<String>) {
    let labels: HashSet<&str> = CATALOG
        .iter()
        .flat_map(|d| d.labels.iter().copied())
        .collect();
    let (mut metrics, mut recorded) = (Vec::new(), Vec::new());
    let tokens = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
    for token in tokens.filter(|t| !t.is_empty()) {
        if token.contains(':') && !token.starts_with(':') {
            recorded.push(token.to_owned());
        } else if ["http_", "brisk_", "db_"]
            .iter()
            .any(|p| token.starts_with(p))
            && !labels.contains(token)
        {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| token.strip_suffix(suffix))
                .unwrap_or(token);
            metrics.push(base.to_owned());
        }
    }
    (metrics, recorded)
}

fn assert_in_catalog(source: &str, names: &[String]) {
    let catalog: HashSet<&str> = CATALOG.iter().map(|d| d.name).collect();
    for name in names {
        assert!(
            catalog.contains(name.as_str()),
            "{source} queries `{name}`, not in the catalog"
        );
    }
}

#[test]
fn dashboard_queries_only_catalog_metrics() {
    let (_, text) = doc("grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = HashSet::new();
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let (metrics, recorded) = metric_names(expr);
            assert!(
                recorded.is_empty(),
                "the dashboard must not need the recording rules"
            );
            assert!(!metrics.is_empty(), "{expr} queries no brisk metric");
            assert_in_catalog("grafana-dashboard.json", &metrics);
            queried.extend(metrics);
        }
    }
    // The panels the issue asks for, by the metric each needs.
    for needed in [
        "http_server_request_duration_seconds",
        "brisk_cache_requests_total",
        "brisk_batch_size",
        "db_client_connection_wait_time_seconds",
        "brisk_ratelimit_decisions_total",
    ] {
        assert!(queried.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn rules_query_only_catalog_metrics_and_their_own_records() {
    let (_, text) = doc("prometheus-rules.yml");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    let groups = rules["groups"].as_sequence().expect("groups");
    let all: Vec<&serde_yaml::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .collect();
    let records: HashSet<&str> = all.iter().filter_map(|r| r["record"].as_str()).collect();
    let alerts: Vec<&str> = all.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert!(alerts.len() >= 2, "an SLO alert and an error-ratio alert");
    for rule in &all {
        let expr = rule["expr"].as_str().expect("every rule has an expr");
        let (metrics, recorded) = metric_names(expr);
        assert_in_catalog("prometheus-rules.yml", &metrics);
        for name in recorded {
            assert!(
                records.contains(name.as_str()),
                "{expr} uses `{name}`, which no rule records"
            );
        }
    }
    for quantile in ["p50", "p95", "p99"] {
        assert!(
            records.iter().any(|r| r.contains(quantile)),
            "no {quantile} recording rule"
        );
    }
}
