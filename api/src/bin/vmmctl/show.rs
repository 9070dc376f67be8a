//! Human-readable replies: info, counters, ping, balloon.

use api::request::{BalloonStatistics, Counters, PingInfo, VmInfo};
use config::{MemoryBacking, SerialConfig, VmConfig};

pub(crate) fn show_balloon(stats: &BalloonStatistics) -> String {
    const PAGE: u64 = 4096;
    let mut lines = vec![
        format!(
            "target: {} ({} pages)",
            mib(stats.target_pages * PAGE),
            stats.target_pages
        ),
        format!(
            "actual: {} ({} pages)",
            mib(stats.actual_pages * PAGE),
            stats.actual_pages
        ),
        format!(
            "inflated: {} ({} pages given back to the host)",
            mib(stats.inflated_pages * PAGE),
            stats.inflated_pages
        ),
    ];
    match stats.age_ms {
        None => lines.push("guest statistics: none yet".to_string()),
        Some(age) => lines.push(format!(
            "guest statistics: {:.1} s old",
            age as f64 / 1000.0
        )),
    }
    let sizes = [
        ("free memory", stats.free_memory),
        ("total memory", stats.total_memory),
        ("available memory", stats.available_memory),
        ("disk caches", stats.disk_caches),
        ("swapped in", stats.swap_in),
        ("swapped out", stats.swap_out),
        ("scanned by kswapd", stats.async_scans),
        ("scanned directly", stats.direct_scans),
        ("reclaimed by kswapd", stats.async_reclaims),
        ("reclaimed directly", stats.direct_reclaims),
    ];
    for (name, value) in sizes {
        if let Some(value) = value {
            lines.push(format!("  {name}: {}", mib(value)));
        }
    }
    let counts = [
        ("major faults", stats.major_faults),
        ("minor faults", stats.minor_faults),
        ("hugetlb allocations", stats.hugetlb_allocations),
        ("hugetlb failures", stats.hugetlb_failures),
        ("oom kills", stats.oom_kills),
        ("allocation stalls", stats.alloc_stalls),
    ];
    for (name, value) in counts {
        if let Some(value) = value {
            lines.push(format!("  {name}: {value}"));
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

pub(crate) fn show_ping(ping: &PingInfo) -> String {
    format!(
        "vmm {} pid {} state {}\n",
        ping.version, ping.pid, ping.state
    )
}

pub(crate) fn mib(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{mib:.1} MiB")
    }
}

pub(crate) fn rate(limit: &Option<config::RateLimitConfig>) -> Option<String> {
    let limit = limit.as_ref().filter(|l| !l.is_unlimited())?;
    let mut parts = Vec::new();
    if let Some(bytes) = limit.bytes_per_sec.filter(|&b| b > 0) {
        parts.push(format!("{bytes} B/s"));
    }
    if let Some(ops) = limit.ops_per_sec.filter(|&o| o > 0) {
        parts.push(format!("{ops} ops/s"));
    }
    Some(format!("rate {}", parts.join(" ")))
}

/// `3723000` ms as `1h 2m 3s`; days as `2d 3h`.
fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

pub(crate) fn show_info(info: &VmInfo) -> String {
    let config: &VmConfig = &info.config;
    let mut lines = Vec::new();
    if let Some(name) = &info.name {
        lines.push(format!("name: {name}"));
    }
    lines.push(format!("state: {}", info.state));
    if info.pid != 0 {
        lines.push(format!("pid: {}", info.pid));
    }
    if let Some(ms) = info.uptime_ms {
        lines.push(format!("uptime: {}", uptime(ms)));
    }
    if info.pid != 0 {
        lines.push(format!(
            "cpu time: {:.1} s",
            info.cpu_time_ms as f64 / 1000.0
        ));
    }
    let cpus = &config.cpus;
    let share: Vec<String> = [
        cpus.weight.map(|w| format!("weight {w}")),
        cpus.max_percent
            .map(|p| format!("at most {p}% of a host CPU")),
        cpus.affinity.as_ref().map(|a| format!("on host CPUs {a}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if share.is_empty() {
        lines.push(format!("vcpus: {}", cpus.boot_vcpus));
    } else {
        lines.push(format!("vcpus: {} ({})", cpus.boot_vcpus, share.join(", ")));
    }
    if let Some(dir) = &info.cgroup {
        lines.push(format!("cgroup: {}", dir.display()));
    }
    let backing = match config.memory.backing {
        MemoryBacking::Anonymous => "anonymous",
        MemoryBacking::Memfd => "memfd",
        MemoryBacking::Hugetlbfs => "hugetlbfs",
    };
    let mergeable = if config.memory.mergeable {
        ", mergeable"
    } else {
        ""
    };
    let thp = if config.transparent_huge_pages() {
        ", transparent huge pages"
    } else {
        ""
    };
    lines.push(format!(
        "memory: {} MiB ({backing}{mergeable}{thp})",
        config.memory.size_mib
    ));
    lines.push(match &config.payload.boot_disk {
        Some(disk) => format!("kernel: from disk {disk}"),
        None => format!("kernel: {}", config.payload.kernel.display()),
    });
    lines.push(format!("cmdline: {}", config.payload.cmdline));
    if let Some(initrd) = &config.payload.initrd {
        lines.push(format!("initrd: {}", initrd.display()));
    }
    lines.push(match &config.serial {
        SerialConfig::Stdout => "serial: stdout".to_string(),
        SerialConfig::Off => "serial: off".to_string(),
        SerialConfig::Pty => match &info.serial_pty {
            Some(pty) => format!("serial: pty {}", pty.display()),
            None => "serial: pty".to_string(),
        },
        SerialConfig::File { path } => format!("serial: file {}", path.display()),
        SerialConfig::Socket { path, .. } => format!("serial: socket {}", path.display()),
    });
    if config.disks.is_empty() {
        lines.push("disks: none".to_string());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let mut line = format!("disk {id}: {}", disk.path.display());
        if disk.readonly {
            line.push_str(" readonly");
        }
        if disk.direct {
            line.push_str(" direct");
        }
        if let Some(serial) = &disk.serial {
            line.push_str(&format!(" serial={serial}"));
        }
        if let Some(size) = disk.logical_block_size {
            line.push_str(&format!(" logical_block_size={size}"));
        }
        if let Some(size) = disk.physical_block_size {
            line.push_str(&format!(" physical_block_size={size}"));
        }
        if let Some(rate) = rate(&disk.rate_limit) {
            line.push_str(&format!(" {rate}"));
        }
        lines.push(line);
    }
    if config.nets.is_empty() {
        lines.push("nets: none".to_string());
    }
    for (i, net) in config.nets.iter().enumerate() {
        let id = net.id.clone().unwrap_or_else(|| format!("net{i}"));
        let mut line = format!("net {id}:");
        if let Some(tap) = &net.tap {
            line.push_str(&format!(" tap {tap}"));
        }
        if let Some(fd) = net.fd {
            line.push_str(&format!(" fd {fd}"));
        }
        if let Some(mac) = &net.mac {
            line.push_str(&format!(" mac {mac}"));
        }
        if let Some(rate) = rate(&net.rate_limit) {
            line.push_str(&format!(" {rate}"));
        }
        lines.push(line);
    }
    if let Some(balloon) = &config.balloon {
        let mut line = format!("balloon: target {} MiB", balloon.target_mib);
        if balloon.deflate_on_oom {
            line.push_str(", deflate on oom");
        }
        if balloon.free_page_reporting {
            line.push_str(", free page reporting");
        }
        if balloon.stats_interval_s > 0 {
            line.push_str(&format!(", stats every {} s", balloon.stats_interval_s));
        }
        lines.push(line);
    }
    lines.push(format!(
        "on reset: {}",
        match config.on_reset {
            config::ResetAction::Exit => "exit",
            config::ResetAction::Reboot => "reboot",
        }
    ));
    if let Some(memory) = &info.memory {
        lines.push(format!(
            "host memory: guest {}, rss {}, pss {}",
            mib(memory.guest_bytes),
            mib(memory.rss_bytes),
            memory.pss_bytes.map_or_else(|| "-".to_string(), mib)
        ));
        if let (Some(target), Some(actual)) =
            (memory.balloon_target_bytes, memory.balloon_actual_bytes)
        {
            lines.push(format!(
                "balloon now: target {}, actual {}",
                mib(target),
                mib(actual)
            ));
        }
        if let Some(pages) = memory.ksm_merging_pages {
            lines.push(format!("ksm: {pages} pages merged"));
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

pub(crate) fn show_counters(counters: &Counters) -> String {
    let rows: Vec<(&str, &str, String)> = counters
        .iter()
        .flat_map(|(component, values)| {
            values
                .iter()
                .map(move |(name, value)| (component.as_str(), name.as_str(), value.to_string()))
        })
        .collect();
    if rows.is_empty() {
        return "no counters\n".to_string();
    }
    let width = |header: &str, column: &dyn Fn(&(&str, &str, String)) -> usize| {
        rows.iter()
            .map(column)
            .chain([header.len()])
            .max()
            .unwrap_or(0)
    };
    let w0 = width("COMPONENT", &|r| r.0.len());
    let w1 = width("COUNTER", &|r| r.1.len());
    let w2 = width("VALUE", &|r| r.2.len());
    let mut text = format!(
        "{:<w0$}  {:<w1$}  {:>w2$}\n",
        "COMPONENT", "COUNTER", "VALUE"
    );
    for (component, name, value) in &rows {
        text.push_str(&format!("{component:<w0$}  {name:<w1$}  {value:>w2$}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_make_a_table() {
        let mut counters = Counters::new();
        counters.insert(
            "vcpu0".into(),
            [("exits".to_string(), 12345u64), ("io".to_string(), 7)].into(),
        );
        let table = show_counters(&counters);
        assert_eq!(
            table,
            "COMPONENT  COUNTER  VALUE\nvcpu0      exits    12345\nvcpu0      io           7\n"
        );
        assert_eq!(show_counters(&Counters::new()), "no counters\n");
    }
}
