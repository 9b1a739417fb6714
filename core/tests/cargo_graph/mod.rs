//! The workspace's dependency graph as `cargo metadata` reports it, walked the way a build
//! resolves it: normal dependencies only, and optional ones only where the features actually
//! enabled switch them on. Shared by the crate-graph rules: `core/tests/io_free.rs` and
//! `bench/tests/crate_graph.rs` (which includes this file by path).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use serde_json::Value;

pub struct Graph {
    packages: BTreeMap<String, Value>,
    /// Per package id: (dependency name as declared, package id) of its resolved deps.
    resolved: BTreeMap<String, Vec<(String, String)>>,
}

impl Graph {
    pub fn load() -> Self {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let output = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(&manifest)
            .output()
            .expect("running cargo metadata");
        assert!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata JSON");
        let packages: BTreeMap<String, Value> = metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (p["id"].as_str().expect("id").to_owned(), p.clone()))
            .collect();
        let resolved = metadata["resolve"]["nodes"]
            .as_array()
            .expect("resolve nodes")
            .iter()
            .map(|node| {
                let deps = node["deps"]
                    .as_array()
                    .expect("deps")
                    .iter()
                    .map(|d| {
                        let id = d["pkg"].as_str().expect("pkg").to_owned();
                        let name = packages[&id]["name"].as_str().expect("name").to_owned();
                        (name, id)
                    })
                    .collect();
                (node["id"].as_str().expect("id").to_owned(), deps)
            })
            .collect();
        Self { packages, resolved }
    }

    fn id_of(&self, name: &str) -> String {
        self.packages
            .iter()
            .find(|(_, p)| p["name"] == name && p["source"].is_null())
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| panic!("no workspace package {name}"))
    }

    /// Every package `root` builds with (normal dependencies, through enabled features),
    /// by name.
    pub fn closure(&self, root: &str, features: &[&str]) -> BTreeSet<String> {
        let mut seen: BTreeSet<(String, BTreeSet<String>)> = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut todo = vec![(
            self.id_of(root),
            features
                .iter()
                .map(|f| (*f).to_owned())
                .collect::<BTreeSet<String>>(),
        )];
        while let Some((id, requested)) = todo.pop() {
            if !seen.insert((id.clone(), requested.clone())) {
                continue;
            }
            let package = &self.packages[&id];
            names.insert(package["name"].as_str().expect("name").to_owned());
            let (enabled_deps, dep_features) = enabled(package, &requested);
            for dep in package["dependencies"].as_array().expect("dependencies") {
                if !dep["kind"].is_null() {
                    continue; // dev and build dependencies are not part of what runs
                }
                let name = dep["name"].as_str().expect("dep name");
                let key = dep["rename"].as_str().unwrap_or(name);
                if dep["optional"] == true && !enabled_deps.contains(key) {
                    continue;
                }
                let Some((_, dep_id)) = self.resolved[&id].iter().find(|(n, _)| n == name) else {
                    continue; // a dependency of another platform
                };
                let mut wanted: BTreeSet<String> = dep["features"]
                    .as_array()
                    .expect("features")
                    .iter()
                    .map(|f| f.as_str().expect("feature").to_owned())
                    .collect();
                if dep["uses_default_features"] == true {
                    wanted.insert("default".to_owned());
                }
                wanted.extend(dep_features.get(key).cloned().unwrap_or_default());
                todo.push((dep_id.clone(), wanted));
            }
        }
        names
    }
}

/// The optional dependencies `requested` features switch on, and the features they ask of
/// each dependency (`dep/feature`).
fn enabled(
    package: &Value,
    requested: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let table = &package["features"];
    let mut deps = BTreeSet::new();
    let mut dep_features: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut todo: Vec<String> = requested.iter().cloned().collect();
    let mut done = BTreeSet::new();
    while let Some(feature) = todo.pop() {
        if !done.insert(feature.clone()) {
            continue;
        }
        let Some(entries) = table[&feature].as_array() else {
            // No such feature: an optional dependency named as one (implicit feature).
            deps.insert(feature);
            continue;
        };
        for entry in entries.iter().filter_map(Value::as_str) {
            if let Some(dep) = entry.strip_prefix("dep:") {
                deps.insert(dep.to_owned());
            } else if let Some((dep, feature)) = entry.split_once('/') {
                let (dep, weak) = dep
                    .strip_suffix('?')
                    .map_or((dep, false), |dep| (dep, true));
                if !weak {
                    deps.insert(dep.to_owned());
                }
                dep_features
                    .entry(dep.to_owned())
                    .or_default()
                    .insert(feature.to_owned());
            } else {
                todo.push(entry.to_owned());
            }
        }
    }
    (deps, dep_features)
}
