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
