//! `api/openapi.yaml` against the route table and the Rust types.
//!
//! - The set of (method, path) in the YAML equals the route table's, with the
//!   same request body (schema, required or not) and success reply.
//! - Fully populated values of every API type (one per enum variant) are
//!   validated against their schemas: no key, type or enum value that the
//!   YAML does not describe, no required key missing.
//! - Every property and every string enum value in the YAML's schemas was
//!   produced by some Rust value: nothing described that the types lack.
//! - What the YAML says is required is exactly what serde cannot do without.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use api::http::{BodyKind, ROUTES};
use api::request::{
    ActionReply, ApiError, ApiErrorKind, BalloonStatistics, BalloonUpdate, Counters, MemoryInfo,
    MigrationParameters, MigrationPhase, MigrationRole, MigrationStatus, PingInfo,
    ReceiveMigrationRequest, ResumeRequest, SendMigrationRequest, ShutdownMode, ShutdownRequest,
    TimeoutAction, VmInfo, VmState,
};
use config::{
    BalloonConfig, CpusConfig, DiskConfig, MemoryBacking, MemoryConfig, NetConfig, PayloadConfig,
    RateLimitConfig, ResetAction, SerialConfig, VmConfig,
};

const METHODS: [&str; 8] = [
    "get", "put", "post", "patch", "delete", "head", "options", "trace",
];

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    doc
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

#[test]
fn paths_match_the_route_table() {
    let doc = document();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "routes not in openapi.yaml: {undocumented:?}; in openapi.yaml but not routed: {unserved:?}"
    );
}

#[test]
fn bodies_and_replies_match_the_route_table() {
    let doc = document();
    for route in ROUTES {
        let op = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
        let what = format!("{} {}", route.method, route.path);
        let body = &op["requestBody"];
        match route.body {
            BodyKind::None => assert!(body.is_null(), "{what}: the YAML has a request body"),
            BodyKind::Optional(schema) | BodyKind::Required(schema) => {
                let required = matches!(route.body, BodyKind::Required(_));
                assert_eq!(
                    body["required"].as_bool().unwrap_or(false),
                    required,
                    "{what}"
                );
                assert_eq!(
                    body["content"]["application/json"]["schema"],
                    schema_ref(schema),
                    "{what}"
                );
            }
        }
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: not in openapi.yaml, or without responses"));
        let success: Vec<&String> = responses.keys().filter(|c| c.starts_with('2')).collect();
        assert_eq!(success, vec![&route.reply.status().to_string()], "{what}");
        let content = &responses[success[0].as_str()]["content"];
        match route.reply.schema() {
            Some(schema) => {
                assert_eq!(
                    content["application/json"]["schema"],
                    schema_ref(schema),
                    "{what}"
                )
            }
            None => assert!(content.is_null(), "{what}: a 204 has no content"),
        }
        assert!(
            responses.contains_key("default"),
            "{what}: no error response"
        );
    }
}

/// (schema location, property name or enum value) pairs.
type Locations = BTreeSet<(String, String)>;

/// Validates values against the YAML's schemas, and records which schema
/// properties and enum values the values used.
struct Checker {
    doc: Value,
    errors: Vec<String>,
    properties: BTreeSet<(String, String)>,
    enum_values: BTreeSet<(String, String)>,
}

impl Checker {
    fn new() -> Checker {
        Checker {
            doc: document(),
            errors: Vec::new(),
            properties: BTreeSet::new(),
            enum_values: BTreeSet::new(),
        }
    }

    fn named(&self, name: &str) -> Value {
        let schema = self.doc["components"]["schemas"][name].clone();
        assert!(!schema.is_null(), "no schema {name} in openapi.yaml");
        schema
    }

    /// `schema` seen at `location` (a schema name, or a path below one).
    fn resolve(&self, schema: &Value, location: &str) -> (Value, String) {
        match schema["$ref"].as_str() {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
                (self.named(name), name.to_string())
            }
            None => (schema.clone(), location.to_string()),
        }
    }

    fn value<T: Serialize>(&mut self, schema: &str, value: &T) {
        let value = serde_json::to_value(value).unwrap();
        self.check(&schema_ref(schema), &value, schema, "$");
    }

    fn check(&mut self, schema: &Value, value: &Value, location: &str, at: &str) {
        let (schema, location) = self.resolve(schema, location);
        let type_ok = match schema["type"].as_str() {
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some(other) => {
                self.errors
                    .push(format!("{location}: unknown type {other}"));
                return;
            }
            None => {
                self.errors.push(format!("{location}: no type"));
                return;
            }
        };
        if !type_ok {
            self.errors
                .push(format!("{at}: {value} is not of type {}", schema["type"]));
            return;
        }
        if let Some(values) = schema["enum"].as_array() {
            if !values.contains(value) {
                self.errors
                    .push(format!("{at}: {value} is not in the enum of {location}"));
            }
            if let Some(text) = value.as_str() {
                self.enum_values
                    .insert((location.clone(), text.to_string()));
            }
        }
        if let Some(n) = value.as_f64() {
            if schema["minimum"].as_f64().is_some_and(|min| n < min)
                || schema["maximum"].as_f64().is_some_and(|max| n > max)
            {
                self.errors
                    .push(format!("{at}: {n} is out of the range of {location}"));
            }
        }
        if let Some(items) = value.as_array() {
            for (i, item) in items.iter().enumerate() {
                self.check(
                    &schema["items"],
                    item,
                    &format!("{location}[]"),
                    &format!("{at}[{i}]"),
                );
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema["properties"].as_object();
            for required in schema["required"].as_array().into_iter().flatten() {
                let key = required.as_str().unwrap();
                if !object.contains_key(key) {
                    self.errors.push(format!("{at}: required {key} is missing"));
                }
                if !properties.is_some_and(|p| p.contains_key(key)) {
                    self.errors
                        .push(format!("{location}: required {key} is not a property"));
                }
            }
            for (key, item) in object {
                let at = format!("{at}.{key}");
                if let Some(property) = properties.and_then(|p| p.get(key)) {
                    self.properties.insert((location.clone(), key.clone()));
                    self.check(property, item, &format!("{location}.{key}"), &at);
                } else if schema["additionalProperties"].is_object() {
                    self.check(
                        &schema["additionalProperties"],
                        item,
                        &format!("{location}{{}}"),
                        &at,
                    );
                } else {
                    self.errors.push(format!(
                        "{at}: not a property of {location} in openapi.yaml"
                    ));
                }
            }
        }
    }

    /// Every property and string enum value the YAML describes, by location.
    /// (properties, string enum values), each as (location, name).
    fn described(&self) -> (Locations, Locations) {
        fn walk(
            schema: &Value,
            location: &str,
            properties: &mut BTreeSet<(String, String)>,
            enums: &mut BTreeSet<(String, String)>,
        ) {
            if schema.get("$ref").is_some() {
                return;
            }
            for value in schema["enum"].as_array().into_iter().flatten() {
                if let Some(text) = value.as_str() {
                    enums.insert((location.to_string(), text.to_string()));
                }
            }
            for (key, property) in schema["properties"].as_object().into_iter().flatten() {
                properties.insert((location.to_string(), key.clone()));
                walk(property, &format!("{location}.{key}"), properties, enums);
            }
            if schema["items"].is_object() {
                walk(
                    &schema["items"],
                    &format!("{location}[]"),
                    properties,
                    enums,
                );
            }
            if schema["additionalProperties"].is_object() {
                walk(
                    &schema["additionalProperties"],
                    &format!("{location}{{}}"),
                    properties,
                    enums,
                );
            }
        }
        let mut properties = BTreeSet::new();
        let mut enums = BTreeSet::new();
        for (name, schema) in self.doc["components"]["schemas"].as_object().unwrap() {
            walk(schema, name, &mut properties, &mut enums);
        }
        (properties, enums)
    }
}

fn all_states() -> Vec<VmState> {
    use VmState::*;
    // A new variant fails to compile here: add it to the list too.
    let all = vec![
        NotCreated,
        Created,
        Running,
        Paused,
        ShuttingDown,
        Shutdown,
        Migrated,
        MigrationUndecided,
    ];
    for state in &all {
        match state {
            NotCreated | Created | Running | Paused | ShuttingDown | Shutdown | Migrated
            | MigrationUndecided => {}
        }
    }
    all
}

fn all_error_kinds() -> Vec<ApiErrorKind> {
    use ApiErrorKind::*;
    let all = vec![
        BadRequest,
        NotFound,
        MethodNotAllowed,
        WrongState,
        TooLarge,
        Internal,
    ];
    for kind in &all {
        match kind {
            BadRequest | NotFound | MethodNotAllowed | WrongState | TooLarge | Internal => {}
        }
    }
    all
}

fn all_serials() -> Vec<SerialConfig> {
    let all = vec![
        SerialConfig::Stdout,
        SerialConfig::File {
            path: "/tmp/serial.log".into(),
        },
        SerialConfig::Pty,
        SerialConfig::Socket {
            path: "/tmp/serial.sock".into(),
            buffer_bytes: Some(1 << 20),
            group: Some("vmm-ops".into()),
        },
        SerialConfig::Off,
    ];
    for serial in &all {
        match serial {
            SerialConfig::Stdout
            | SerialConfig::File { .. }
            | SerialConfig::Pty
            | SerialConfig::Socket { .. }
            | SerialConfig::Off => {}
        }
    }
    all
}

fn all_backings() -> Vec<MemoryBacking> {
    use MemoryBacking::*;
    let all = vec![Anonymous, Memfd, Hugetlbfs];
    for backing in &all {
        match backing {
            Anonymous | Memfd | Hugetlbfs => {}
        }
    }
    all
}

fn all_reset_actions() -> Vec<ResetAction> {
    use ResetAction::*;
    let all = vec![Exit, Reboot];
    for action in &all {
        match action {
            Exit | Reboot => {}
        }
    }
    all
}

fn all_shutdown_modes() -> Vec<ShutdownMode> {
    use ShutdownMode::*;
    let all = vec![Graceful, Force, CtrlAltDel];
    for mode in &all {
        match mode {
            Graceful | Force | CtrlAltDel => {}
        }
    }
    all
}

fn all_timeout_actions() -> Vec<TimeoutAction> {
    use TimeoutAction::*;
    let all = vec![Cancel, Force];
    for action in &all {
        match action {
            Cancel | Force => {}
        }
    }
    all
}

fn all_migration_phases() -> Vec<MigrationPhase> {
    use MigrationPhase::*;
    let all = vec![
        None, Setup, Active, SwitchOver, Completed, Failed, Cancelled,
    ];
    for phase in &all {
        match phase {
            None | Setup | Active | SwitchOver | Completed | Failed | Cancelled => {}
        }
    }
    all
}

/// MigrationParameters with every optional field set.
fn full_parameters(timeout_action: TimeoutAction) -> MigrationParameters {
    MigrationParameters {
        downtime_ms: 150,
        bandwidth_bytes_per_s: Some(100 << 20),
        timeout_s: Some(600),
        timeout_action,
        auto_converge: false,
    }
}

fn full_send_migration(timeout_action: TimeoutAction) -> SendMigrationRequest {
    SendMigrationRequest {
        destination: "tcp:192.168.1.20:6000".into(),
        token: "s3cret".into(),
        tls_dir: Some("/etc/vmm/tls".into()),
        force: true,
        parameters: full_parameters(timeout_action),
    }
}

fn full_receive_migration() -> ReceiveMigrationRequest {
    ReceiveMigrationRequest {
        listen: "unix:/run/vmm/migrate.sock".into(),
        token: "s3cret".into(),
        tls_dir: Some("/etc/vmm/tls".into()),
        timeout_s: Some(600),
    }
}

/// A MigrationStatus with every optional field set.
fn full_migration_status(phase: MigrationPhase, role: MigrationRole) -> MigrationStatus {
    MigrationStatus {
        phase,
        role: Some(role),
        total_time_ms: 5300,
        setup_time_ms: 12,
        expected_downtime_ms: 80,
        downtime_ms: 95,
        total_bytes: 1 << 30,
        transferred_bytes: 900 << 20,
        remaining_bytes: 4 << 20,
        zero_pages: 150_000,
        data_pages: 110_000,
        dirty_pages_rate: 2500,
        throughput_bytes_per_s: 110 << 20,
        iterations: 4,
        throttle_percent: 20,
        error: Some("connection reset by the destination".into()),
    }
}

/// A VmConfig with every optional field set (struct literals: a new field
/// fails to compile here until it is filled in).
fn full_config(serial: SerialConfig, backing: MemoryBacking, on_reset: ResetAction) -> VmConfig {
    let rate_limit = Some(RateLimitConfig {
        bytes_per_sec: Some(1 << 20),
        ops_per_sec: Some(100),
    });
    VmConfig {
        name: Some("web1".into()),
        cpus: CpusConfig {
            boot_vcpus: 4,
            weight: Some(300),
            max_percent: Some(150),
            affinity: Some("0-1,3".into()),
        },
        memory: MemoryConfig {
            size_mib: 1024,
            backing,
            mergeable: true,
            thp: Some(false),
            overcommit: true,
        },
        payload: PayloadConfig {
            kernel: "/boot/vmlinux".into(),
            cmdline: "console=ttyS0".into(),
            initrd: Some("/boot/initrd".into()),
            boot_disk: Some("root".into()),
        },
        serial,
        disks: vec![DiskConfig {
            path: "/dev/vg/disk".into(),
            id: Some("root".into()),
            readonly: true,
            direct: true,
            serial: Some("SERIAL1".into()),
            logical_block_size: Some(512),
            physical_block_size: Some(4096),
            rate_limit: rate_limit.clone(),
        }],
        nets: vec![NetConfig {
            tap: Some("tap0".into()),
            fd: Some(3),
            id: Some("eth0".into()),
            mac: Some("52:54:00:12:34:56".into()),
            rate_limit,
            bridge: Some("br0".into()),
        }],
        balloon: Some(BalloonConfig {
            target_mib: 64,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval_s: 5,
        }),
        on_reset,
    }
}

fn full_configs() -> Vec<VmConfig> {
    let mut configs = Vec::new();
    for serial in all_serials() {
        configs.push(full_config(
            serial,
            MemoryBacking::Anonymous,
            ResetAction::Exit,
        ));
    }
    for backing in all_backings() {
        for on_reset in all_reset_actions() {
            configs.push(full_config(SerialConfig::Stdout, backing, on_reset));
        }
    }
    configs
}

fn full_info(state: VmState) -> VmInfo {
    VmInfo {
        name: Some("web1".into()),
        state,
        pid: 4242,
        uptime_ms: Some(60_000),
        cpu_time_ms: 1500,
        config: full_config(
            SerialConfig::Pty,
            MemoryBacking::Anonymous,
            ResetAction::Exit,
        ),
        serial_pty: Some(PathBuf::from("/dev/pts/3")),
        memory: Some(MemoryInfo {
            guest_bytes: 1 << 30,
            rss_bytes: 100 << 20,
            pss_bytes: Some(90 << 20),
            ksm_merging_pages: Some(1200),
            ksm_rmap_items: Some(260_000),
            ksm_process_profit: Some(-4096),
            balloon_target_bytes: Some(256 << 20),
            balloon_actual_bytes: Some(200 << 20),
        }),
        cgroup: Some(PathBuf::from("/sys/fs/cgroup/vmm.slice/vm-web1")),
    }
}

/// BalloonStatistics with every guest statistic set.
fn full_balloon_statistics() -> BalloonStatistics {
    BalloonStatistics {
        target_pages: 65536,
        actual_pages: 51200,
        target_mib: 256,
        actual_mib: 200,
        inflated_pages: 51200,
        timestamp_ms: Some(1_700_000_000_000),
        age_ms: Some(1500),
        swap_in: Some(0),
        swap_out: Some(4096),
        major_faults: Some(12),
        minor_faults: Some(345_678),
        free_memory: Some(300 << 20),
        total_memory: Some(768 << 20),
        available_memory: Some(500 << 20),
        disk_caches: Some(120 << 20),
        hugetlb_allocations: Some(0),
        hugetlb_failures: Some(0),
        oom_kills: Some(1),
        alloc_stalls: Some(2),
        async_scans: Some(1 << 20),
        direct_scans: Some(4096),
        async_reclaims: Some(1 << 19),
        direct_reclaims: Some(4096),
    }
}

fn counters() -> Counters {
    let mut counters = Counters::new();
    counters.insert("vcpu0".into(), [("exits".to_string(), 10u64)].into());
    counters
}

#[test]
fn schemas_describe_exactly_the_rust_types() {
    let mut checker = Checker::new();
    for config in full_configs() {
        checker.value("VmConfig", &config);
    }
    checker.value(
        "VmConfig",
        &VmConfig::from_json(br#"{"payload": {"kernel": "/k"}}"#).unwrap(),
    );
    for state in all_states() {
        checker.value("VmInfo", &full_info(state));
        checker.value(
            "PingInfo",
            &PingInfo {
                version: "0.1.0".into(),
                pid: 1,
                name: Some("web1".into()),
                state,
            },
        );
        checker.value("ActionReply", &ActionReply::done(state, "paused"));
    }
    let mut bare = full_info(VmState::NotCreated);
    bare.serial_pty = None;
    bare.memory = None;
    bare.name = None;
    bare.uptime_ms = None;
    checker.value("VmInfo", &bare);
    for mode in all_shutdown_modes() {
        checker.value(
            "ShutdownRequest",
            &ShutdownRequest {
                mode,
                timeout_ms: Some(1000),
            },
        );
    }
    checker.value("ShutdownRequest", &ShutdownRequest::default());
    checker.value("ResumeRequest", &ResumeRequest { force: true });
    for kind in all_error_kinds() {
        checker.value("ApiError", &ApiError::new(kind, "no"));
    }
    checker.value("Counters", &counters());
    checker.value("Counters", &Counters::new());
    for action in all_timeout_actions() {
        checker.value("MigrationParameters", &full_parameters(action));
        checker.value("SendMigrationRequest", &full_send_migration(action));
    }
    checker.value("MigrationParameters", &MigrationParameters::default());
    checker.value(
        "SendMigrationRequest",
        &SendMigrationRequest {
            destination: "unix:/m.sock".into(),
            token: "t".into(),
            tls_dir: None,
            force: false,
            parameters: MigrationParameters::default(),
        },
    );
    checker.value("ReceiveMigrationRequest", &full_receive_migration());
    for phase in all_migration_phases() {
        for role in [MigrationRole::Send, MigrationRole::Receive] {
            checker.value("MigrationStatus", &full_migration_status(phase, role));
        }
    }
    checker.value("MigrationStatus", &MigrationStatus::default());
    checker.value("BalloonUpdate", &BalloonUpdate { target_mib: 64 });
    checker.value(
        "SnapshotRequest",
        &api::request::SnapshotRequest {
            destination: "/var/lib/vmm/snapshots/web1".into(),
        },
    );
    checker.value(
        "RestoreRequest",
        &api::request::RestoreRequest {
            source: "/var/lib/vmm/snapshots/web1".into(),
        },
    );
    checker.value("BalloonStatistics", &full_balloon_statistics());
    checker.value("BalloonStatistics", &BalloonStatistics::default());
    let mut no_ksm = full_info(VmState::Running);
    no_ksm.memory = Some(MemoryInfo::default());
    checker.value("VmInfo", &no_ksm);

    assert!(
        checker.errors.is_empty(),
        "openapi.yaml does not match the Rust types:\n{}",
        checker.errors.join("\n")
    );
    let (properties, enums) = checker.described();
    let missing: Vec<_> = properties.difference(&checker.properties).collect();
    assert!(
        missing.is_empty(),
        "described in openapi.yaml but not in the Rust types: {missing:?}"
    );
    let missing: Vec<_> = enums.difference(&checker.enum_values).collect();
    assert!(
        missing.is_empty(),
        "enum values in openapi.yaml that the Rust types lack: {missing:?}"
    );
}

/// Properties whose need depends on another field (the YAML describes them
/// as optional, with the condition in words).
const CONDITIONAL: &[(&str, &str)] = &[("SerialConfig", "path")];

/// For each key of `full` (recursively), removing it must fail to
/// deserialize exactly when the schema lists it as required.
fn check_required<T: DeserializeOwned + Serialize>(checker: &Checker, schema: &str, full: &T) {
    let full = serde_json::to_value(full).unwrap();
    let mut errors = Vec::new();
    let mut walk_stack = vec![(schema_ref(schema), schema.to_string(), Vec::<Value>::new())];
    while let Some((schema, location, path)) = walk_stack.pop() {
        let (schema, location) = checker.resolve(&schema, &location);
        let value = path.iter().fold(&full, |v, step| match step {
            Value::String(key) => &v[key.as_str()],
            Value::Number(i) => &v[i.as_u64().unwrap() as usize],
            _ => unreachable!(),
        });
        if let Some(items) = value.as_array() {
            if !items.is_empty() {
                let mut item_path = path.clone();
                item_path.push(json!(0));
                walk_stack.push((schema["items"].clone(), format!("{location}[]"), item_path));
            }
        }
        let (Some(object), Some(properties)) =
            (value.as_object(), schema["properties"].as_object())
        else {
            continue;
        };
        let required: Vec<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for key in object.keys() {
            let mut trimmed = full.clone();
            let parent = path.iter().fold(&mut trimmed, |v, step| match step {
                Value::String(k) => &mut v[k.as_str()],
                Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
                _ => unreachable!(),
            });
            parent.as_object_mut().unwrap().remove(key);
            let accepted = serde_json::from_value::<T>(trimmed).is_ok();
            let says_required = required.contains(&key.as_str());
            if accepted == says_required
                && !CONDITIONAL.contains(&(location.as_str(), key.as_str()))
            {
                errors.push(format!(
                    "{location}.{key}: openapi.yaml says {}, serde says {}",
                    if says_required {
                        "required"
                    } else {
                        "optional"
                    },
                    if accepted { "optional" } else { "required" }
                ));
            }
            if let Some(property) = properties.get(key) {
                let mut child = path.clone();
                child.push(json!(key));
                walk_stack.push((property.clone(), format!("{location}.{key}"), child));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn required_properties_match_serde() {
    let checker = Checker::new();
    for config in full_configs() {
        check_required(&checker, "VmConfig", &config);
    }
    check_required(&checker, "VmInfo", &full_info(VmState::Running));
    check_required(
        &checker,
        "PingInfo",
        &PingInfo {
            version: "1".into(),
            pid: 1,
            name: Some("web1".into()),
            state: VmState::Running,
        },
    );
    check_required(
        &checker,
        "ActionReply",
        &ActionReply::already(VmState::Paused, "already paused"),
    );
    check_required(
        &checker,
        "ShutdownRequest",
        &ShutdownRequest {
            mode: ShutdownMode::Force,
            timeout_ms: Some(5),
        },
    );
    check_required(&checker, "ApiError", &ApiError::internal("x"));
    check_required(
        &checker,
        "MigrationParameters",
        &full_parameters(TimeoutAction::Force),
    );
    check_required(
        &checker,
        "SendMigrationRequest",
        &full_send_migration(TimeoutAction::Force),
    );
    check_required(
        &checker,
        "ReceiveMigrationRequest",
        &full_receive_migration(),
    );
    check_required(
        &checker,
        "MigrationStatus",
        &full_migration_status(MigrationPhase::Failed, MigrationRole::Send),
    );
    check_required(&checker, "BalloonUpdate", &BalloonUpdate { target_mib: 1 });
    check_required(&checker, "BalloonStatistics", &full_balloon_statistics());
}

#[test]
fn the_checker_catches_drift() {
    // A key the YAML lacks, a wrong type and a missing required key are all
    // reported: the checks above can fail.
    let mut checker = Checker::new();
    let mut config = serde_json::to_value(full_config(
        SerialConfig::Off,
        MemoryBacking::Memfd,
        ResetAction::Exit,
    ))
    .unwrap();
    config["cpus"]["max_vcpus"] = json!(8);
    config["memory"]["size_mib"] = json!("big");
    config["disks"][0].as_object_mut().unwrap().remove("path");
    checker.check(&schema_ref("VmConfig"), &config, "VmConfig", "$");
    let errors = checker.errors.join("\n");
    assert!(
        errors.contains("$.cpus.max_vcpus: not a property"),
        "{errors}"
    );
    assert!(errors.contains("$.memory.size_mib"), "{errors}");
    assert!(
        errors.contains("$.disks[0]: required path is missing"),
        "{errors}"
    );
}
