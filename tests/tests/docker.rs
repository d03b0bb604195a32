//! The `docker/` files: the nats-server configs pass `nats-server -t`, the
//! generated `auth.conf` matches `hookbus nats-config` for the compose's plugins
//! (`UPDATE_DOCKER=1` rewrites it), and `compose.yaml` is valid YAML whose
//! referenced files exist.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use core_events::Subjects;
use hookbus::nats_config::{self, Passwords};
use hookbus_tests::{nats_server_binary, workspace_root};
use serde_norway::Value;

fn docker_dir() -> PathBuf {
    workspace_root().join("docker")
}

fn compose() -> Value {
    let path = docker_dir().join("compose.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The `ENABLED_PLUGINS` of the compose's bus service.
fn compose_plugins(compose: &Value) -> Vec<String> {
    let bus = &compose["services"]["bus"];
    let plugins = str_of(&bus["environment"], "ENABLED_PLUGINS").unwrap();
    hookbus::config::parse_enabled_plugins(plugins)
}

#[test]
fn auth_conf_matches_the_generator() {
    let plugins = compose_plugins(&compose());
    let expected =
        nats_config::render(&Subjects::default(), &plugins, &Passwords::EnvRefs, 1).unwrap();
    let path = docker_dir().join("nats/auth.conf");
    if std::env::var_os("UPDATE_DOCKER").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{} is not what `hookbus nats-config --enabled-plugins {}` generates; \
         regenerate with UPDATE_DOCKER=1 cargo test -p hookbus-tests --test docker",
        path.display(),
        plugins.join(",")
    );
}

#[test]
fn nats_configs_pass_nats_server_test() {
    let compose = compose();
    let plugins = compose_plugins(&compose);
    let mut users = vec![
        nats_config::BUS_USER.to_owned(),
        nats_config::HOST_USER.to_owned(),
    ];
    users.extend(plugins);
    for conf in ["nats/nats-server.conf", "nats/cluster-node.conf"] {
        let path = docker_dir().join(conf);
        let mut cmd = Command::new(nats_server_binary());
        cmd.arg("-t").arg("-c").arg(&path).current_dir(docker_dir());
        for user in &users {
            cmd.env(nats_config::password_env_var(user), "test-password");
        }
        // The cluster example reads its name and routes from the environment.
        cmd.env("NATS_SERVER_NAME", "n1")
            .env("NATS_ROUTE_1", "nats://n1:6222")
            .env("NATS_ROUTE_2", "nats://n2:6222")
            .env("NATS_ROUTE_3", "nats://n3:6222");
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "nats-server -t -c {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Host path of a short-syntax volume (`./a:/b:ro`), when it is a path.
fn volume_source(volume: &str) -> Option<&str> {
    let source = volume.split(':').next()?;
    (source.starts_with("./") || source.starts_with("../") || source.starts_with('/'))
        .then_some(source)
}

#[test]
fn compose_references_files_that_exist() {
    let compose = compose();
    let base = docker_dir();
    let services = compose["services"].as_mapping().unwrap();
    for name in [
        "nats",
        "postgres",
        "bus",
        "host",
        "console",
        "hello-world",
        "audit-log",
        "flaky",
    ] {
        assert!(
            services.contains_key(Value::from(name)),
            "service {name} is missing"
        );
    }
    let mut checked = 0;
    let exists = |p: &Path, what: &str| {
        assert!(p.exists(), "{what}: {} does not exist", p.display());
    };
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if let Some(build) = service.get("build") {
            let context = base.join(str_of(build, "context").unwrap_or("."));
            exists(&context, &format!("{name}: build context"));
            let dockerfile = context.join(str_of(build, "dockerfile").unwrap_or("Dockerfile"));
            exists(&dockerfile, &format!("{name}: dockerfile"));
            checked += 2;
        }
        for volume in service
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if let Some(source) = volume.as_str().and_then(volume_source) {
                exists(&base.join(source), &format!("{name}: volume"));
                checked += 1;
            }
        }
        let image = str_of(service, "image");
        assert!(
            image.is_some() || service.get("build").is_some(),
            "{name} has neither image nor build"
        );
    }
    assert!(checked >= 4, "checked only {checked} references");
    // Every password the NATS config reads is passed to the nats service.
    let env = &compose["services"]["nats"]["environment"];
    let mut users = vec![
        nats_config::BUS_USER.to_owned(),
        nats_config::HOST_USER.to_owned(),
    ];
    users.extend(compose_plugins(&compose));
    for user in users {
        let var = nats_config::password_env_var(&user);
        assert!(env.get(&var).is_some(), "nats service lacks {var}");
    }
    // The files the docs and the Dockerfile name.
    for file in ["Dockerfile", "Dockerfile.dockerignore", ".env.example"] {
        exists(&base.join(file), file);
    }
}

/// `docker/compose.cluster.yaml`, its `<<` merge keys applied.
fn compose_cluster() -> Value {
    let path = docker_dir().join("compose.cluster.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut value: Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    value.apply_merge().unwrap();
    value
}

/// The cluster profile: three nodes, each with `cluster-node.conf` and its own
/// name, routes to all three, every password; each node's config passes
/// `nats-server -t` with the environment the profile gives it; every client
/// lists the three servers, and the bus and the host create R3 streams.
#[test]
fn cluster_profile_runs_three_nodes_whose_configs_pass_nats_server_test() {
    let cluster = compose_cluster();
    let base = compose();
    let services = &cluster["services"];
    let nodes = ["nats", "nats-2", "nats-3"];
    let mut users = vec![
        nats_config::BUS_USER.to_owned(),
        nats_config::HOST_USER.to_owned(),
    ];
    users.extend(compose_plugins(&base));
    let mut names = Vec::new();
    for node in nodes {
        let service = &services[node];
        let command: Vec<&str> = service["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{node} has no command"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(command, ["-c", "/etc/nats/cluster-node.conf"], "{node}");
        for volume in service["volumes"].as_sequence().unwrap() {
            if let Some(source) = volume.as_str().and_then(volume_source) {
                let path = docker_dir().join(source);
                assert!(path.exists(), "{node}: {} does not exist", path.display());
            }
        }
        let env = &service["environment"];
        let name = str_of(env, "NATS_SERVER_NAME").unwrap_or_else(|| panic!("{node}: no name"));
        names.push(name.to_owned());
        let mut cmd = Command::new(nats_server_binary());
        cmd.arg("-t")
            .arg("-c")
            .arg(docker_dir().join("nats/cluster-node.conf"))
            .current_dir(docker_dir());
        for route in ["NATS_ROUTE_1", "NATS_ROUTE_2", "NATS_ROUTE_3"] {
            let url = str_of(env, route).unwrap_or_else(|| panic!("{node}: no {route}"));
            let host = url.trim_start_matches("nats://").split(':').next().unwrap();
            assert!(nodes.contains(&host), "{node}: {route}={url} is no node");
            cmd.env(route, url);
        }
        for user in &users {
            let var = nats_config::password_env_var(user);
            assert!(env.get(&var).is_some(), "{node} lacks {var}");
            cmd.env(var, "test-password");
        }
        let out = cmd
            .env("NATS_SERVER_NAME", name)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{node}: nats-server -t -c cluster-node.conf: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "every node has its own name: {names:?}");

    // Every client of compose.yaml lists the three servers.
    for (name, service) in base["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if str_of(&service["environment"], "NATS_URL").is_none() {
            continue;
        }
        let url = str_of(&services[name]["environment"], "NATS_URL")
            .unwrap_or_else(|| panic!("{name}: the cluster profile sets no NATS_URL"));
        let hosts: Vec<String> = nats_config::server_addrs(url)
            .unwrap()
            .iter()
            .map(|a| a.host().to_owned())
            .collect();
        assert_eq!(hosts, nodes, "{name}: NATS_URL={url}");
    }
    for name in ["bus", "host"] {
        assert_eq!(
            str_of(&services[name]["environment"], "HOOKBUS_STREAM_REPLICAS"),
            Some("3"),
            "{name}"
        );
    }
    // Both commands read it (the host creates the streams when it starts first).
    for command in ["run", "host"] {
        let out = Command::new(hookbus_tests::hookbus_binary())
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("HOOKBUS_STREAM_REPLICAS"),
            "hookbus {command} --help:\n{help}"
        );
    }
}
