//! No Docker engine runs in CI, so the compose file is checked statically: every variable it
//! sets for a Colony service is one that service's config reads (the binaries reject unknown
//! keys, so `--check-config` with exactly that environment proves it), mounted config files
//! load, workers can be scaled, and Prometheus scrapes every service.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test on error")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use colony_testkit::binary;
use serde_yaml::Value;

const SERVICES: [(&str, &str); 5] = [
    ("orchestrator", "ORCHESTRATOR"),
    ("router", "ROUTER"),
    ("memory", "MEMORY"),
    ("monitor", "MONITOR"),
    ("agent-worker", "AGENT_WORKER"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_yaml::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    value
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `binary --check-config` with exactly `env` (plus PATH) and returns (success, output).
fn check_config(
    binary_name: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> (bool, String) {
    let output = Command::new(binary(binary_name))
        .args(args)
        .arg("--check-config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .current_dir(repo())
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn every_compose_variable_is_read_by_its_service() {
    let compose = compose();
    for (service, prefix) in SERVICES {
        let spec = &compose["services"][service];
        assert!(spec.is_mapping(), "service {service} missing from compose");
        let command = strings(&spec["command"]);
        let (binary_name, args) = command.split_first().unwrap();
        assert_eq!(binary_name, &format!("colony-{service}"));

        // Map container paths of mounted files back to the repository.
        let mounts: BTreeMap<String, String> = strings(&spec["volumes"])
            .iter()
            .filter_map(|volume| {
                let mut parts = volume.split(':');
                let host = parts.next()?;
                Some((parts.next()?.to_owned(), host.to_owned()))
            })
            .collect();
        let args: Vec<String> = args
            .iter()
            .map(|a| mounts.get(a).cloned().unwrap_or_else(|| a.clone()))
            .collect();

        let env: BTreeMap<String, String> = spec["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().unwrap().to_owned(), value)
            })
            .collect();
        for key in env.keys() {
            assert!(
                key.starts_with(&format!("{prefix}__")),
                "{service}: {key} is not a {prefix}__ config key, so nothing reads it"
            );
        }
        let (ok, output) = check_config(binary_name, &args, &env);
        assert!(ok, "{service} rejects its compose environment:\n{output}");
    }
}

#[test]
fn native_configs_load() {
    for (service, _) in SERVICES {
        let file = repo().join(format!("deploy/config/native/{service}.toml"));
        let (ok, output) = check_config(
            &format!("colony-{service}"),
            &["--config".into(), file.to_string_lossy().into_owned()],
            &BTreeMap::new(),
        );
        assert!(ok, "{}: {output}", file.display());
    }
}

#[test]
fn an_unknown_variable_is_refused_before_start() {
    let env = BTreeMap::from([("MONITOR__NO_SUCH_KEY".to_owned(), "1".to_owned())]);
    let (ok, output) = check_config("colony-monitor", &[], &env);
    assert!(!ok);
    assert!(output.contains("no_such_key"), "{output}");
}

#[test]
fn workers_scale_and_prometheus_scrapes_every_service() {
    let compose = compose();
    let worker = &compose["services"]["agent-worker"];
    assert!(
        worker["container_name"].is_null(),
        "a fixed name prevents --scale"
    );
    assert!(
        worker["ports"].is_null(),
        "a fixed host port prevents --scale"
    );
    for service in ["nats", "postgres", "prometheus", "grafana"] {
        assert!(
            compose["services"][service].is_mapping(),
            "{service} missing"
        );
    }
    let prometheus =
        std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    for (service, _) in SERVICES {
        assert!(
            prometheus.contains(service),
            "prometheus does not scrape {service}"
        );
    }
    // The alert rules (checked by `make check-alerts`) are loaded, and mounted where the
    // configuration looks for them.
    assert!(
        prometheus.contains("rule_files:\n  - alerts.yml"),
        "{prometheus}"
    );
    let volumes: Vec<&str> = compose["services"]["prometheus"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|volume| volume.as_str())
        .collect();
    assert!(
        volumes.contains(&"./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"),
        "{volumes:?}"
    );
}

#[test]
fn every_service_exports_traces_to_tempo_and_grafana_reads_them() {
    let compose = compose();
    assert!(compose["services"]["tempo"].is_mapping(), "tempo missing");
    let tempo = std::fs::read_to_string(repo().join("deploy/tempo/tempo.yml")).unwrap();
    assert!(tempo.contains("endpoint: 0.0.0.0:4317"), "{tempo}");
    for (service, prefix) in SERVICES {
        let variable = format!("{prefix}__TELEMETRY__OTLP_ENDPOINT");
        assert_eq!(
            compose["services"][service]["environment"][variable.as_str()].as_str(),
            Some("http://tempo:4317"),
            "{service} does not export its spans"
        );
    }
    let datasources =
        std::fs::read_to_string(repo().join("deploy/grafana/provisioning/datasources/colony.yml"))
            .unwrap();
    let datasources: serde_yaml::Value = serde_yaml::from_str(&datasources).unwrap();
    let tempo = datasources["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|source| source["type"] == "tempo")
        .expect("a Tempo datasource");
    assert_eq!(tempo["url"].as_str(), Some("http://tempo:3200"));
}
