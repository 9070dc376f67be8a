//! The VM config: the JSON document (config file, `vm.create` body,
//! migration payload) and the command-line specs (`--disk`, `--net`,
//! `--serial`, `--memory`, `--balloon`). Nothing may panic, and whatever is
//! accepted must survive its own JSON encoding unchanged (the migration
//! source sends it, `vm.info` shows it), and still validate.
#![no_main]

use config::{BalloonConfig, DiskConfig, MemoryConfig, NetConfig, SerialConfig, VmConfig};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) -> T {
    let json = serde_json::to_vec(value).expect("an accepted config encodes");
    let back: T = config::from_json(&json).unwrap_or_else(|e| {
        panic!(
            "{value:?} encodes as {}, which does not parse: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(&back, value, "changed through JSON");
    back
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 6 == 0 {
        if let Ok(config) = VmConfig::from_json(rest) {
            round_trip(&config)
                .validate()
                .expect("the round trip still validates");
            let mut with_ids = config.clone();
            with_ids.assign_device_ids();
            with_ids.validate().expect("assigned ids validate");
            config
                .check_migration_compatible(&config)
                .expect("a config fits itself");
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 6 {
        1 => {
            if let Ok(c) = DiskConfig::parse(text) {
                round_trip(&c).validate().expect("validates");
            }
        }
        2 => {
            if let Ok(c) = NetConfig::parse(text) {
                round_trip(&c).validate().expect("validates");
            }
        }
        3 => {
            if let Ok(c) = SerialConfig::parse(text) {
                round_trip(&c).validate().expect("validates");
            }
        }
        4 => {
            if let Ok(c) = MemoryConfig::parse(text) {
                round_trip(&c).validate().expect("validates");
            }
        }
        _ => {
            if let Ok(c) = BalloonConfig::parse(text) {
                round_trip(&c).validate().expect("validates");
            }
        }
    }
});
