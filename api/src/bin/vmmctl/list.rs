//! `vmmctl list`: every VMM in the socket directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::http::ApiClient;

use crate::show::mib;
use crate::EXIT_UNREACHABLE;
use api::request::VmInfo;

/// One VMM found by `list`.
#[derive(Debug, Default, PartialEq, serde::Serialize)]
pub(crate) struct ListEntry {
    /// The socket's file name without `.sock`.
    name: String,
    socket: PathBuf,
    /// The VM's state, or `stale` when nothing answers on the socket.
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balloon_target_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balloon_actual_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ksm_merging_pages: Option<u64>,
    /// Why a socket is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Pings every `*.sock` socket in `dir` (in parallel) and reads its VM's
/// memory figures. A missing directory is an empty list.
pub(crate) fn list_vmms(dir: &Path, timeout: Duration) -> Result<Vec<ListEntry>, (u8, String)> {
    let sockets = api::discover::vmm_sockets(dir).map_err(|e| {
        (
            EXIT_UNREACHABLE,
            format!("cannot read {}: {e}", dir.display()),
        )
    })?;
    let entries = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .into_iter()
            .map(|(name, path)| scope.spawn(move || probe_vmm(name, path, timeout)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    Ok(entries)
}

pub(crate) fn probe_vmm(name: String, socket: PathBuf, timeout: Duration) -> ListEntry {
    let client = ApiClient::new(&socket).with_timeout(timeout);
    let mut entry = ListEntry {
        name,
        socket,
        ..ListEntry::default()
    };
    match client.ping() {
        Ok(ping) => {
            entry.state = ping.state.to_string();
            entry.pid = Some(ping.pid);
        }
        Err(e) => {
            entry.state = if e.is_unreachable() { "stale" } else { "error" }.to_string();
            entry.error = Some(e.to_string());
            return entry;
        }
    }
    // A VMM without a VM answers 409: its memory columns stay empty.
    if let Ok(VmInfo {
        memory: Some(memory),
        ..
    }) = client.info()
    {
        entry.guest_bytes = Some(memory.guest_bytes);
        entry.rss_bytes = Some(memory.rss_bytes);
        entry.pss_bytes = memory.pss_bytes;
        entry.balloon_target_bytes = memory.balloon_target_bytes;
        entry.balloon_actual_bytes = memory.balloon_actual_bytes;
        entry.ksm_merging_pages = memory.ksm_merging_pages;
    }
    entry
}

pub(crate) fn show_list(dir: &Path, entries: &[ListEntry]) -> String {
    if entries.is_empty() {
        return format!("no VMM sockets in {}\n", dir.display());
    }
    let dash = || "-".to_string();
    let size = |v: Option<u64>| v.map_or_else(dash, mib);
    let headers = [
        "NAME",
        "PID",
        "STATE",
        "GUEST",
        "RSS",
        "PSS",
        "BALLOON",
        "ACTUAL",
        "KSM-MERGED",
    ];
    let rows: Vec<[String; 9]> = entries
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.pid.map_or_else(dash, |p| p.to_string()),
                e.state.clone(),
                size(e.guest_bytes),
                size(e.rss_bytes),
                size(e.pss_bytes),
                size(e.balloon_target_bytes),
                size(e.balloon_actual_bytes),
                e.ksm_merging_pages.map_or_else(dash, |p| p.to_string()),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            // Names and states left-aligned, figures right-aligned.
            if i == 0 || i == 2 {
                line.push_str(&format!("{cell:<w$}", w = widths[i]));
            } else {
                line.push_str(&format!("{cell:>w$}", w = widths[i]));
            }
            line.push_str("  ");
        }
        line.trim_end().to_string() + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in &rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    let live: Vec<&ListEntry> = entries.iter().filter(|e| e.pid.is_some()).collect();
    let sum = |f: fn(&ListEntry) -> Option<u64>| live.iter().filter_map(|e| f(e)).sum::<u64>();
    text.push_str(&format!(
        "total: {} VMMs ({} stale), guest {}, rss {}, balloon targets {}, ksm merged {} pages\n",
        entries.len(),
        entries.len() - live.len(),
        mib(sum(|e| e.guest_bytes)),
        mib(sum(|e| e.rss_bytes)),
        mib(sum(|e| e.balloon_target_bytes)),
        sum(|e| e.ksm_merging_pages),
    ));
    text
}

#[cfg(test)]
mod tests {
    use api::request::BalloonStatistics;

    use super::*;
    use crate::json;
    use crate::show::show_balloon;

    #[test]
    fn list_and_balloon_print_tables() {
        let entries = vec![
            ListEntry {
                name: "web".into(),
                socket: "/run/vmm/web.sock".into(),
                state: "running".into(),
                pid: Some(4242),
                guest_bytes: Some(1 << 30),
                rss_bytes: Some(300 << 20),
                pss_bytes: Some(200 << 20),
                balloon_target_bytes: Some(256 << 20),
                balloon_actual_bytes: Some(128 << 20),
                ksm_merging_pages: Some(1234),
                error: None,
            },
            ListEntry {
                name: "old".into(),
                socket: "/run/vmm/old.sock".into(),
                state: "stale".into(),
                error: Some("no VMM is listening".into()),
                ..ListEntry::default()
            },
        ];
        assert_eq!(
            show_list(Path::new("/run/vmm"), &entries),
            "NAME   PID  STATE       GUEST      RSS      PSS  BALLOON   ACTUAL  KSM-MERGED\n\
             web   4242  running  1024 MiB  300 MiB  200 MiB  256 MiB  128 MiB        1234\n\
             old      -  stale           -        -        -        -        -           -\n\
             total: 2 VMMs (1 stale), guest 1024 MiB, rss 300 MiB, balloon targets 256 MiB, ksm merged 1234 pages\n"
        );
        assert_eq!(show_list(Path::new("/x"), &[]), "no VMM sockets in /x\n");
        let json = json(&entries);
        assert!(json.contains(r#""state": "stale""#), "{json}");
        assert!(!json.contains(r#""pid": null"#), "{json}");

        let mut stats = BalloonStatistics {
            target_pages: 65536,
            actual_pages: 256,
            target_mib: 256,
            actual_mib: 1,
            inflated_pages: 256,
            ..BalloonStatistics::default()
        };
        let text = show_balloon(&stats);
        assert_eq!(
            text,
            "target: 256 MiB (65536 pages)\nactual: 1 MiB (256 pages)\n\
             inflated: 1 MiB (256 pages given back to the host)\nguest statistics: none yet\n"
        );
        stats.age_ms = Some(1500);
        stats.free_memory = Some(3 << 19);
        stats.major_faults = Some(9);
        let text = show_balloon(&stats);
        assert!(
            text.contains(
                "guest statistics: 1.5 s old\n  free memory: 1.5 MiB\n  major faults: 9\n"
            ),
            "{text}"
        );
    }
}
