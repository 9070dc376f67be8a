//! `vmm-web`, the host web console, against real VMMs running the test
//! guest: every endpoint over HTTP (including what an attacker would try:
//! cross-site POSTs, forged Host headers, no credentials from another host),
//! and end to end in a real headless Chromium driven through chromedriver.
//! Screenshots go to target/web-screenshots/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api::http::ApiClient;
use api::request::VmState;
use serde_json::{json, Value};
use vmm_tests::harness::{TempDir, Vmm};
use vmm_tests::netns::{self, ip, Netns};
use vmm_tests::require_kvm;
use vmm_tests::web::{
    browser_available, first_event, http, http_unix, web_refuses, Browser, WebConsole,
};

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
const PAGE: Duration = Duration::from_secs(30);
const MIGRATE: Duration = Duration::from_secs(90);
const EXIT_MIGRATED: i32 = 6;
const TOKEN: &str = "web-migration-token";
const LOGIN_TOKEN: &str = "correct horse battery staple";

/// A socket directory with test guests in it, and a vmm-web watching it.
struct Host {
    dir: TempDir,
    socks: PathBuf,
    guests: Vec<(String, Vmm)>,
}

impl Host {
    fn new(tag: &str) -> Host {
        let dir = TempDir::new(tag);
        let socks = dir.join("socks");
        std::fs::create_dir(&socks).unwrap();
        Host {
            dir,
            socks,
            guests: Vec::new(),
        }
    }

    /// Boots the test guest as `name` (API socket NAME.sock, console on a
    /// socket), running `commands`, with `extra` VMM flags.
    fn boot(&mut self, name: &str, commands: &str, extra: &[&str]) -> &Vmm {
        let console = self.dir.join(&format!("{name}.console"));
        let api = self.socks.join(format!("{name}.sock"));
        let mut args = vec![
            "--serial".to_string(),
            format!("socket={}", console.display()),
            "--api-socket".into(),
            api.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vmm = Vmm::boot_testguest(&format!("-- {commands}"), &args);
        vmm.wait_api(BOOT);
        self.guests.push((name.to_string(), vmm));
        &self.guests.last().unwrap().1
    }

    fn vmm(&mut self, name: &str) -> &mut Vmm {
        &mut self
            .guests
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no guest {name}"))
            .1
    }

    fn api(&self, name: &str) -> ApiClient {
        ApiClient::new(self.socks.join(format!("{name}.sock")))
    }

    /// vmm-web on 127.0.0.1 (any free port) for this socket directory.
    fn web(&self, extra: &[&str], env: &[(&str, &str)]) -> WebConsole {
        let socks = self.socks.display().to_string();
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--socket-dir",
            &socks,
            "--interval-ms",
            "500",
        ];
        args.extend_from_slice(extra);
        WebConsole::start(&args, env)
    }
}

/// A session cookie and its CSRF token, as the page gets them.
fn session(web: &WebConsole) -> (String, String) {
    let reply = web.get("/api/session", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let cookie = reply.cookie().expect("a session cookie");
    let set = reply.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let csrf = reply.json()["csrf_token"].as_str().unwrap().to_string();
    (cookie, csrf)
}

fn wait_state(api: &ApiClient, state: VmState) {
    let deadline = Instant::now() + SHORT;
    while api.ping().map(|p| p.state).ok() != Some(state) {
        assert!(Instant::now() < deadline, "never {state:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the guest list has `names`, every one with a pid.
fn wait_listed(web: &WebConsole, names: &[&str]) -> Value {
    let deadline = Instant::now() + BOOT;
    loop {
        let list = web.get("/api/guests", &[]).json();
        let listed: Vec<&str> = list["guests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["pid"].is_u64())
            .filter_map(|g| g["name"].as_str())
            .collect();
        if names.iter().all(|n| listed.contains(n)) {
            return list;
        }
        assert!(Instant::now() < deadline, "never listed {names:?}: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn private_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn every_page_and_query_answers_and_gets_change_nothing() {
    require_kvm!();
    let mut host = Host::new("web-get");
    // vmm-web first: a socket console's output reaches only a connected
    // reader, and the guest prints once it had time to connect.
    let web = host.web(&[], &[]);
    let disk = host_disk(&host, "g1");
    host.boot(
        "g1",
        "sleep ms=5000; echo hello from g1",
        &[
            "--disk",
            &format!("path={disk}"),
            "--balloon",
            "target_mib=0",
        ],
    );
    let list = wait_listed(&web, &["g1"]);
    let g1 = &list["guests"][0];
    assert_eq!(g1["state"], "running");
    assert_eq!(g1["vcpus"], 1);
    assert_eq!(g1["memory"]["configured_bytes"], 128u64 << 20);
    assert!(g1["memory"]["rss_bytes"].as_u64().unwrap() > 0, "{g1}");
    assert_eq!(g1["disks"][0]["id"], "disk0");
    assert_eq!(g1["console"], "socket");
    assert!(g1["balloon"].as_bool().unwrap());

    // The page and its assets, with the headers that keep it to itself.
    let page = web.get("/", &[]);
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/assets/app.js"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    for (asset, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let reply = web.get(asset, &[]);
        assert_eq!(reply.status, 200, "{asset}");
        assert!(reply.header("content-type").unwrap().starts_with(kind));
    }
    assert_eq!(web.get("/assets/../Cargo.toml", &[]).status, 404);
    assert_eq!(web.get("/nothing-here", &[]).status, 404);
    // Without a login token there is no login page.
    assert_eq!(web.get("/login", &[]).status, 303);

    let info = web.get("/api/session", &[]).json();
    assert_eq!(info["auth_required"], false);
    assert_eq!(info["csrf_token"].as_str().unwrap().len(), 64);

    // The live list arrives as server-sent events.
    let (status, data) = first_event(&web.addr, "/api/events", &[], "snapshot");
    assert_eq!(status, 200);
    let snapshot: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(snapshot["guests"][0]["name"], "g1");

    let detail = web.get("/api/guests/g1", &[]).json();
    assert_eq!(detail["ping"]["state"], "running");
    assert_eq!(detail["info"]["config"]["cpus"]["boot_vcpus"], 1);
    assert!(detail["counters"]["disk0"]["read_ops"].is_u64(), "{detail}");
    assert!(detail["balloon"]["target_pages"].is_u64(), "{detail}");
    assert_eq!(detail["migration"]["phase"], "none");
    assert_eq!(detail["errors"], json!([]));

    let console = wait_console(&web, "g1", "hello from g1");
    assert_eq!(console["writable"], true);
    let next = console["next"].as_u64().unwrap();
    let again = web
        .get(&format!("/api/guests/g1/console?since={next}"), &[])
        .json();
    assert!(
        !again["text"].as_str().unwrap().contains("hello"),
        "{again}"
    );

    let cluster = web.get("/api/cluster", &[]);
    assert_eq!(cluster.status, 200);
    let cluster = cluster.json();
    if !cluster["available"].as_bool().unwrap() {
        // No cluster on this host: the reason, in words.
        assert!(!cluster["reason"].as_str().unwrap().is_empty(), "{cluster}");
    }

    assert_eq!(web.get("/api/guests/nobody", &[]).status, 404);
    assert_eq!(web.get("/api/guests/..%2Fetc", &[]).status, 404);
    // Actions are POST only: a GET (a link, an <img>) changes nothing.
    for action in ["pause", "stop", "shutdown", "migrate", "balloon", "console"] {
        let reply = web.get(&format!("/api/guests/g1/{action}"), &[]);
        assert!(
            reply.status == 405 || (action == "console" && reply.status == 200),
            "GET {action}: {}",
            reply.status
        );
    }
    assert_eq!(web.get("/api/cluster/move", &[]).status, 405);
    assert_eq!(host.api("g1").ping().unwrap().state, VmState::Running);
}

fn host_disk(host: &Host, name: &str) -> String {
    let path = host.dir.join(&format!("{name}.img"));
    std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
    path.display().to_string()
}

fn wait_console(web: &WebConsole, guest: &str, needle: &str) -> Value {
    let deadline = Instant::now() + PAGE;
    loop {
        let reply = web.get(&format!("/api/guests/{guest}/console?since=0"), &[]);
        if reply.status == 200 {
            let chunk = reply.json();
            if chunk["text"].as_str().unwrap_or_default().contains(needle) {
                return chunk;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the console of {guest} never showed {needle:?}: {}",
            reply.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn state_changes_need_the_sessions_csrf_token_and_the_same_origin() {
    require_kvm!();
    let mut host = Host::new("web-csrf");
    host.boot("g1", "echo up", &[]);
    let web = host.web(&[], &[]);
    wait_listed(&web, &["g1"]);
    let (cookie, csrf) = session(&web);
    let cookie_header = ("Cookie", cookie.as_str());
    let api = host.api("g1");
    // What a foreign page can make a browser send: the cookie (if SameSite
    // did not stop it), no token; or a token it guessed; or its Origin.
    for (headers, why) in [
        (vec![], "no session"),
        (vec![cookie_header], "no token"),
        (
            vec![cookie_header, ("X-CSRF-Token", "0000")],
            "a wrong token",
        ),
        (
            vec![("X-CSRF-Token", csrf.as_str())],
            "a token without its session",
        ),
        (
            vec![cookie_header, ("Authorization", "Bearer anything")],
            "a bearer header where no login token is set",
        ),
        (
            vec![
                cookie_header,
                ("X-CSRF-Token", csrf.as_str()),
                ("Origin", "http://evil.example"),
            ],
            "another origin",
        ),
        (
            vec![
                cookie_header,
                ("X-CSRF-Token", csrf.as_str()),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            "another site",
        ),
    ] {
        let reply = web.post("/api/guests/g1/pause", &headers, "");
        assert_eq!(reply.status, 403, "{why}: {}", reply.text());
        assert!(reply.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("refused: "));
        assert_eq!(api.ping().unwrap().state, VmState::Running, "{why}");
    }
    // A form post from another site (no JSON, no token) fails the same way.
    let form = web.post(
        "/api/guests/g1/stop",
        &[
            cookie_header,
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "x=1",
    );
    assert_eq!(form.status, 403);
    // A page served under another name (DNS rebinding) gets nothing at all.
    let rebound = web.get("/api/guests", &[("Host", "evil.example:8010")]);
    assert_eq!(rebound.status, 421, "{}", rebound.text());
    // The page's own request passes.
    let ok = web.post(
        "/api/guests/g1/pause",
        &[
            cookie_header,
            ("X-CSRF-Token", &csrf),
            ("Origin", &format!("http://{}", web.addr)),
        ],
        "",
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["message"], "g1 is paused");
    wait_state(&api, VmState::Paused);
}

#[test]
fn actions_reach_the_vmm_and_its_refusals_come_back_in_words() {
    require_kvm!();
    let mut host = Host::new("web-actions");
    host.boot(
        "g1",
        "balloon-follow",
        &["--memory", "size=128M", "--balloon", "target_mib=0"],
    );
    host.boot("g2", "echo up", &[]);
    let web = host.web(&[], &[]);
    wait_listed(&web, &["g1", "g2"]);
    let (cookie, csrf) = session(&web);
    let post = |path: &str, body: &str| {
        web.post(path, &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)], body)
    };
    let error = |reply: &vmm_tests::web::Response| {
        reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let g1 = host.api("g1");

    assert_eq!(post("/api/guests/g1/pause", "").status, 200);
    wait_state(&g1, VmState::Paused);
    // Pausing again is done already, not an error.
    assert_eq!(post("/api/guests/g1/pause", "").status, 200);
    // The VMM's own refusal, with its status and words.
    let refused = post("/api/guests/g2/balloon", r#"{"target_mib": 16}"#);
    assert_eq!(refused.status, 409);
    assert!(
        error(&refused).starts_with("guest g2: the VM has no balloon device"),
        "{}",
        error(&refused)
    );
    assert_eq!(post("/api/guests/g1/resume", "").status, 200);
    wait_state(&g1, VmState::Running);

    // Balloon: the target reaches the VMM, the guest follows it.
    let reply = post("/api/guests/g1/balloon", r#"{"target_mib": 16}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let deadline = Instant::now() + SHORT;
    while g1.balloon_statistics().unwrap().actual_mib != 16 {
        assert!(
            Instant::now() < deadline,
            "the balloon never reached 16 MiB"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let too_big = post("/api/guests/g1/balloon", r#"{"target_mib": 4096}"#);
    assert_eq!(too_big.status, 400, "{}", too_big.text());
    assert!(
        error(&too_big).contains("target_mib"),
        "{}",
        error(&too_big)
    );
    let bad_body = post("/api/guests/g1/balloon", r#"{"target": 1}"#);
    assert_eq!(bad_body.status, 400);
    assert!(
        error(&bad_body).contains("unknown field `target`"),
        "{}",
        error(&bad_body)
    );

    // Migration requests are checked before anything moves.
    let token_file = host.dir.join("token");
    private_file(&token_file, &format!("{TOKEN}\n"));
    for (body, status, needle) in [
        (
            json!({"destination": "nowhere", "token_file": token_file}),
            400,
            "is not tcp:HOST:PORT or unix:PATH",
        ),
        (
            json!({"destination": "tcp:127.0.0.1:9", "token_file": "/nonexistent/token"}),
            400,
            "token_file: /nonexistent/token: No such file",
        ),
        (
            json!({"destination": "tcp:127.0.0.1:9", "token_file": "relative"}),
            400,
            "must be an absolute path",
        ),
        (
            json!({"destination": "tcp:127.0.0.1:9", "token_file": token_file, "downtime_ms": 0}),
            400,
            "downtime_ms",
        ),
    ] {
        let reply = post("/api/guests/g1/migrate", &body.to_string());
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        assert!(error(&reply).contains(needle), "{body}: {}", error(&reply));
    }
    assert_eq!(g1.ping().unwrap().state, VmState::Running);
    let cancel = post("/api/guests/g1/migrate-cancel", "");
    assert_eq!(cancel.status, 409, "{}", cancel.text());

    let unknown = post("/api/guests/g1/explode", "");
    assert_eq!(unknown.status, 400);
    assert!(error(&unknown).contains("is not one of pause, resume"));
    assert_eq!(post("/api/guests/nobody/pause", "").status, 404);

    // Reboot exists only if the VMM API has vm.reboot; until then it says so.
    let reboot = post("/api/guests/g1/reboot", "");
    let supported = web.get("/api/session", &[]).json()["reboot_supported"] == true;
    if !supported {
        assert_eq!(reboot.status, 501);
        assert_eq!(
            error(&reboot),
            "guest g1: the VMM has no vm.reboot endpoint"
        );
    }

    // Typing reaches the guest's console.
    let typed = post(
        "/api/guests/g2/console",
        r#"{"data": "echo typed-over-http\r"}"#,
    );
    assert_eq!(typed.status, 204, "{}", typed.text());
    wait_console(&web, "g2", "typed-over-http");

    // Graceful shutdown: the ACPI power button; the test guest powers off.
    let shutdown = post("/api/guests/g2/shutdown", r#"{"timeout_ms": 20000}"#);
    assert_eq!(shutdown.status, 200, "{}", shutdown.text());
    assert_eq!(host.vmm("g2").exit_code(BOOT), 0);
    // Force stop: the VMM ends at once with "stopped by request".
    assert_eq!(post("/api/guests/g1/stop", "").status, 200);
    assert_eq!(host.vmm("g1").exit_code(BOOT), 5);
    // A VMM that is gone is an error in words, not a hang.
    let gone = post("/api/guests/g1/pause", "");
    assert!(gone.status == 404 || gone.status == 502, "{}", gone.text());
}

#[test]
fn vmm_web_refuses_to_serve_beyond_loopback_without_authentication() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let (code, err) = web_refuses(&["--listen", listen, "--socket-dir", "/nonexistent"]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("refusing to serve") && err.contains("--auth-token-file"),
            "{err}"
        );
    }
    let dir = TempDir::new("web-auth-file");
    let open = dir.join("open-token");
    std::fs::write(&open, "t\n").unwrap();
    let (code, err) = web_refuses(&[
        "--listen",
        "0.0.0.0:0",
        "--auth-token-file",
        open.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("every user can read it"), "{err}");
    let (code, err) = web_refuses(&["--listen", "localhost:80"]);
    assert_eq!(code, 2);
    assert!(err.contains("not ADDR:PORT"), "{err}");
}

#[test]
fn a_dead_or_hung_vmm_is_shown_in_words_and_the_others_stay_usable() {
    require_kvm!();
    let mut host = Host::new("web-hung");
    host.boot("g1", "echo up", &[]);
    host.boot("g2", "echo up", &[]);
    // A socket whose VMM died without removing it.
    drop(std::os::unix::net::UnixListener::bind(host.socks.join("dead.sock")).unwrap());
    let web = host.web(&[], &[]);
    wait_listed(&web, &["g1", "g2"]);
    host.vmm("g2").signal(libc::SIGSTOP);
    let listed = |name: &str, state: &str| {
        let list = web.get("/api/guests", &[]).json();
        list["guests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name && g["state"] == state)
            .map(|g| g["error"].as_str().unwrap_or_default().to_string())
    };
    let deadline = Instant::now() + PAGE;
    let (dead, hung) = loop {
        if let (Some(dead), Some(hung)) = (listed("dead", "stale"), listed("g2", "not-answering")) {
            break (dead, hung);
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            web.get("/api/guests", &[]).text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(dead.starts_with("no VMM is listening on"), "{dead}");
    assert!(hung.contains("did not answer within 2 s"), "{hung}");
    // An action on the hung VMM waits for it (in the background) ...
    let (cookie, csrf) = session(&web);
    let addr = web.addr.clone();
    let (c, t) = (cookie.clone(), csrf.clone());
    let stuck = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/api/guests/g2/pause",
            &[("Cookie", &c), ("X-CSRF-Token", &t)],
            Some(b""),
        )
    });
    // ... while the page and the other guests go on.
    let started = Instant::now();
    let pause = web.post(
        "/api/guests/g1/pause",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        "",
    );
    assert_eq!(pause.status, 200, "{}", pause.text());
    assert!(web.get("/api/guests", &[]).status == 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the console waited on the hung VMM"
    );
    let stuck = stuck.join().unwrap();
    assert_eq!(stuck.status, 504, "{}", stuck.text());
    let error = stuck.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("did not answer within 15 s; the request may still take effect"),
        "{error}"
    );
    // Woken up, it answers again (and may then carry out the pause that
    // timed out: its request was already in the socket).
    host.vmm("g2").signal(libc::SIGCONT);
    let deadline = Instant::now() + PAGE;
    while listed("g2", "running").is_none() && listed("g2", "paused").is_none() {
        assert!(Instant::now() < deadline, "g2 never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn on_a_unix_socket_it_serves_only_to_who_may_open_the_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("web-unix");
    let socket = dir.join("web.sock");
    // Not in the VMM socket directory: there it would be listed as a guest.
    let socks = dir.join("socks");
    let _web = WebConsole::start_unix(&socket, &["--socket-dir", socks.to_str().unwrap()]);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let page = http_unix(&socket, "GET", "/", &[]);
    assert_eq!(page.status, 200);
    assert!(page.cookie().is_some());
    let list = http_unix(&socket, "GET", "/api/guests", &[]).json();
    assert_eq!(list["guests"], json!([]));
    // Behind a proxy, Host is the public name: only --allow-host names pass.
    let proxied = http_unix(
        &socket,
        "GET",
        "/api/guests",
        &[("Host", "console.example")],
    );
    assert_eq!(proxied.status, 421);
}

/// A veth pair between this host (10.231.13.1) and a namespace standing for
/// another machine (10.231.13.2).
struct Lan {
    ns: Netns,
    host_if: String,
}

impl Lan {
    const HOST_ADDR: &'static str = "10.231.13.1";
    const PEER_ADDR: &'static str = "10.231.13.2";

    fn new() -> Lan {
        let ns = Netns::create("web");
        let host_if = format!("vw{}", std::process::id() % 100_000);
        let peer_if = format!("{host_if}p");
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::HOST_ADDR),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/24", Self::PEER_ADDR),
            "dev",
            &peer_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &peer_if, "up"]);
        Lan { ns, host_if }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

#[test]
fn beyond_loopback_only_logged_in_users_and_token_holders_get_in() {
    require_kvm!();
    if !netns::available() {
        return;
    }
    let mut host = Host::new("web-lan");
    host.boot("g1", "echo up", &[]);
    let lan = Lan::new();
    let token_file = host.dir.join("login-token");
    private_file(&token_file, &format!("{LOGIN_TOKEN}\n"));
    let web = WebConsole::start(
        &[
            "--listen",
            &format!("{}:0", Lan::HOST_ADDR),
            "--auth-token-file",
            token_file.to_str().unwrap(),
            "--socket-dir",
            host.socks.to_str().unwrap(),
        ],
        &[],
    );
    let addr = web.addr.clone();
    // From the other machine: nothing without credentials.
    let replies = lan.ns.run(move || {
        let bearer = format!("Bearer {LOGIN_TOKEN}");
        let get = |path: &str, headers: &[(&str, &str)]| http(&addr, "GET", path, headers, None);
        vec![
            ("GET /api/guests", get("/api/guests", &[]).status),
            (
                "GET /api/guests/g1/console",
                get("/api/guests/g1/console", &[]).status,
            ),
            ("GET /api/events", get("/api/events", &[]).status),
            ("GET /", get("/", &[]).status),
            (
                "POST pause",
                http(&addr, "POST", "/api/guests/g1/pause", &[], Some(b"")).status,
            ),
            (
                "GET with a wrong token",
                get("/api/guests", &[("Authorization", "Bearer guess")]).status,
            ),
            (
                "GET with a forged cookie",
                get("/api/guests", &[("Cookie", "vmmweb_session=00")]).status,
            ),
            ("GET the login page", get("/login", &[]).status),
            (
                "GET with the token",
                get("/api/guests", &[("Authorization", &bearer)]).status,
            ),
        ]
    });
    let expect = [401, 401, 401, 303, 401, 401, 401, 200, 200];
    for ((what, status), want) in replies.iter().zip(expect) {
        assert_eq!(*status, want, "{what} from another host");
    }
    assert_eq!(host.api("g1").ping().unwrap().state, VmState::Running);
    // Logging in trades the token for a session; its CSRF token then works.
    let login = web.post(
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=correct+horse+battery+staple",
    );
    assert_eq!(login.status, 303, "{}", login.text());
    let cookie = login.cookie().unwrap();
    let info = web.get("/api/session", &[("Cookie", &cookie)]).json();
    assert_eq!(info["auth_required"], true);
    let csrf = info["csrf_token"].as_str().unwrap();
    let pause = web.post(
        "/api/guests/g1/pause",
        &[("Cookie", &cookie), ("X-CSRF-Token", csrf)],
        "",
    );
    assert_eq!(pause.status, 200, "{}", pause.text());
    wait_state(&host.api("g1"), VmState::Paused);
    // Logging out ends the session: the cookie no longer opens anything.
    let logout = web.post(
        "/logout",
        &[("Cookie", &cookie), ("X-CSRF-Token", csrf)],
        "",
    );
    assert_eq!(logout.status, 303, "{}", logout.text());
    assert!(logout.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(web.get("/api/guests", &[("Cookie", &cookie)]).status, 401);
    let wrong = web.post(
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=guess",
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("wrong token"));

    if !browser_available() {
        return;
    }
    // In the browser: the console at the LAN address asks for the token.
    let browser = Browser::start();
    browser.goto(&web.url("/"));
    browser.wait_for(
        "the login form",
        PAGE,
        "return document.getElementById('token') !== null",
        json!([]),
    );
    assert!(browser.current_url().ends_with("/login"));
    browser.fill("#token", "guess");
    browser.click("#login-submit");
    browser.wait_for(
        "the refusal",
        PAGE,
        "return document.body.innerText.includes('wrong token')",
        json!([]),
    );
    browser.screenshot("login-refused.png");
    browser.fill("#token", LOGIN_TOKEN);
    browser.click("#login-submit");
    browser.wait_for(
        "the guest list after logging in",
        PAGE,
        "return document.querySelector('tr[data-guest=\"g1\"] .state')?.innerText === 'paused'",
        json!([]),
    );
}

/// The Pacemaker recipe of resources/ocf/examples, started by
/// `crm_simulate` into a CIB file that crm_mon and crm_resource read
/// offline (`CIB_file`): two nodes, guest vm1 on one of them.
fn simulated_cluster(dir: &TempDir) -> Option<PathBuf> {
    for tool in ["crm_simulate", "crm_mon", "crm_resource"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIP: {tool} is missing (Debian package pacemaker-cli-utils)");
            return None;
        }
    }
    let recipe =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/ocf/examples/lvm-cib.xml");
    let state = dir.join("cib.xml");
    let out = Command::new("crm_simulate")
        .arg("-S")
        .arg("-x")
        .arg(&recipe)
        .arg("-O")
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crm_simulate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(state)
}

fn cib_has_move(cib: &Path, resource: &str, node: &str) -> bool {
    let text = std::fs::read_to_string(cib).unwrap();
    text.lines().any(|l| {
        l.contains(&format!("id=\"cli-prefer-{resource}\""))
            && l.contains(&format!("node=\"{node}\""))
    })
}

#[test]
fn the_cluster_view_shows_nodes_and_guests_and_moves_through_crm_resource() {
    let dir = TempDir::new("web-cluster");
    let Some(cib) = simulated_cluster(&dir) else {
        return;
    };
    let cib_env = cib.display().to_string();
    let socks = dir.join("socks");
    let web = WebConsole::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--socket-dir",
            socks.to_str().unwrap(),
        ],
        &[("CIB_file", &cib_env)],
    );
    let view = web.get("/api/cluster", &[]).json();
    assert_eq!(view["available"], true, "{view}");
    let nodes: Vec<(&str, &str)> = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["state"].as_str().unwrap()))
        .collect();
    assert_eq!(nodes, [("node1", "online"), ("node2", "online")]);
    let vm1 = view["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "vm1")
        .unwrap();
    assert_eq!(vm1["agent"], "ocf:rustvmm:vmm");
    assert_eq!(vm1["guest"], true);
    let from = vm1["nodes"][0].as_str().unwrap().to_string();
    let to = if from == "node1" { "node2" } else { "node1" };

    let (cookie, csrf) = session(&web);
    let post = |path: &str, body: Value| {
        web.post(
            path,
            &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
            &body.to_string(),
        )
    };
    for (body, needle) in [
        (
            json!({"resource": "vm1", "node": "node9"}),
            "no node \"node9\"",
        ),
        (
            json!({"resource": "dlm", "node": to}),
            "no resource \"dlm\" that can be moved",
        ),
        (
            json!({"resource": "--force", "node": to}),
            "no resource \"--force\"",
        ),
    ] {
        let reply = post("/api/cluster/move", body.clone());
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        let error = reply.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(needle), "{body}: {error}");
    }
    assert!(!cib_has_move(&cib, "vm1", to));
    let moved = post("/api/cluster/move", json!({"resource": "vm1", "node": to}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert!(
        cib_has_move(&cib, "vm1", to),
        "crm_resource --move left no constraint"
    );
    let cleared = post("/api/cluster/clear", json!({"resource": "vm1"}));
    assert_eq!(cleared.status, 200, "{}", cleared.text());
    assert!(!cib_has_move(&cib, "vm1", to));

    // Where no cluster runs, the view says why.
    let other = WebConsole::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--socket-dir",
            socks.to_str().unwrap(),
        ],
        &[("CIB_file", "/nonexistent/cib.xml")],
    );
    let view = other.get("/api/cluster", &[]).json();
    assert_eq!(view["available"], false);
    assert!(
        view["reason"]
            .as_str()
            .unwrap()
            .starts_with("crm_mon failed"),
        "{view}"
    );
}

#[test]
fn the_systemd_unit_is_valid() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/systemd/vmm-web.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: systemd-analyze is missing");
        return;
    }
    // Verified with ExecStart pointing at the binary this build made.
    let dir = TempDir::new("web-unit");
    let binary = vmm_tests::harness::workspace_binary("vmm-web");
    let text = text.replace("/usr/local/bin/vmm-web", binary.to_str().unwrap());
    let copy = dir.join("vmm-web.service");
    std::fs::write(&copy, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about other units on this machine are not this unit's problem.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("vmm-web")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

#[test]
fn in_a_browser_the_page_lists_pauses_shows_the_console_and_migrates() {
    require_kvm!();
    if !browser_available() {
        return;
    }
    let mut host = Host::new("web-browser");
    let cluster_dir = TempDir::new("web-browser-cluster");
    let cib = simulated_cluster(&cluster_dir);
    let cib_env = cib.as_ref().map(|c| c.display().to_string());
    let env: Vec<(&str, &str)> = cib_env.iter().map(|c| ("CIB_file", c.as_str())).collect();
    // vmm-web first, so it holds each console from the guest's start.
    let web = host.web(&[], &env);
    let disk = host_disk(&host, "web1");
    host.boot(
        "web1",
        "sleep ms=5000; echo hello from web1; balloon-follow; blk-write sector=0 count=2048 pattern=7",
        &[
            "--cpus",
            "2",
            "--memory",
            "size=256M",
            "--disk",
            &format!("path={disk}"),
            "--balloon",
            "target_mib=32",
        ],
    );
    host.boot(
        "db2",
        "memfill pattern=5a5a5a5a5a5a5a5a mib=48; sleep ms=5000; echo hello from db2",
        &["--memory", "size=128M"],
    );
    let browser = Browser::start();
    browser.goto(&web.url("/"));

    // (1) The list shows both guests running.
    let row_state =
        "return document.querySelector(`tr[data-guest=\"${arguments[0]}\"] .state`)?.innerText";
    for name in ["web1", "db2"] {
        browser.wait_for(
            &format!("{name} running"),
            PAGE,
            &format!("{row_state} === 'running'"),
            json!([name]),
        );
    }
    // Let the charts gather a few samples.
    std::thread::sleep(Duration::from_secs(4));
    browser.screenshot("guests.png");

    // (2) Pause from the page; the VMM is paused; resume likewise.
    browser.click("tr[data-guest=\"web1\"] button[data-action=\"pause\"]");
    wait_state(&host.api("web1"), VmState::Paused);
    browser.wait_for(
        "web1 paused",
        PAGE,
        &format!("{row_state} === 'paused'"),
        json!(["web1"]),
    );
    browser.click("tr[data-guest=\"web1\"] button[data-action=\"resume\"]");
    wait_state(&host.api("web1"), VmState::Running);

    // (3) The guest page shows the guest's own console output; typing is
    // opt-in and reaches the guest.
    browser.goto(&web.url("/#/guest/db2"));
    let console_has =
        "return document.getElementById('console-output')?.innerText.includes(arguments[0])";
    browser.wait_for(
        "db2's console output",
        PAGE,
        console_has,
        json!(["hello from db2"]),
    );
    let input_shown = "return !document.getElementById('console-input').closest('form').hidden";
    assert_eq!(
        browser.exec(input_shown, json!([])),
        false,
        "typing is off by default"
    );
    browser.click("#console-typing");
    browser.fill("#console-input", "echo typed in the browser");
    browser.click("#console-send");
    browser.wait_for(
        "the guest echoing what was typed",
        PAGE,
        console_has,
        json!(["typed in the browser"]),
    );

    // (4) A live migration started from the page to a waiting VMM (another
    // socket directory: another host), followed on the page to the end.
    let elsewhere = TempDir::new("web-browser-target");
    let token_file = host.dir.join("migration.token");
    private_file(&token_file, &format!("{TOKEN}\n"));
    let port = free_port();
    let target = Vmm::spawn(&[
        "--incoming",
        &format!("tcp:127.0.0.1:{port}"),
        "--migration-token-file",
        token_file.to_str().unwrap(),
        "--kernel",
        vmm_tests::harness::testguest().to_str().unwrap(),
        "--memory",
        "size=128M",
        "--serial",
        &format!("socket={}", elsewhere.join("db2.console").display()),
        "--api-socket",
        elsewhere.join("db2.sock").to_str().unwrap(),
    ]);
    target.wait_api(SHORT);
    // A refusal is shown in words: a token file that is not there.
    browser.fill("#mig-dest", &format!("tcp:127.0.0.1:{port}"));
    browser.fill("#mig-token", "/nonexistent/migration.token");
    browser.click("#mig-start");
    browser.wait_for(
        "the refusal in words",
        PAGE,
        "return document.querySelector('#messages .msg-error')?.innerText.includes(arguments[0])",
        json!(["token_file: /nonexistent/migration.token: No such file or directory"]),
    );
    assert_eq!(host.api("db2").ping().unwrap().state, VmState::Running);
    browser.fill("#mig-token", token_file.to_str().unwrap());
    // A bandwidth cap makes the 48 MiB take a few seconds: time to watch.
    browser.fill("#mig-bandwidth", "16");
    browser.click("#mig-start");
    let progress = "const p = document.getElementById('mig-progress'); \
                    return [p.hidden ? -1 : Number(p.value), document.getElementById('mig-phase').innerText]";
    let deadline = Instant::now() + MIGRATE;
    let mut seen: Vec<(f64, String)> = Vec::new();
    let mut shot = false;
    loop {
        let v = browser.exec(progress, json!([]));
        let value = v[0].as_f64().unwrap_or(-1.0);
        let phase = v[1].as_str().unwrap_or_default().to_string();
        if !shot && phase.contains("active") && value > 5.0 {
            browser.screenshot("migration-progress.png");
            shot = true;
        }
        if seen.last().map(|(v, p)| (*v, p.as_str())) != Some((value, phase.as_str())) {
            seen.push((value, phase.clone()));
        }
        if phase.contains("completed") || phase.contains("failed") || phase.contains("cancelled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never ended on the page: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.last().unwrap().1.contains("completed"),
        "the migration did not complete: {seen:?}\n{}",
        browser.page_text()
    );
    assert!(
        seen.iter()
            .any(|(v, p)| p.contains("active") && *v > 0.0 && *v < 100.0),
        "the progress bar never showed the migration under way: {seen:?}"
    );
    eprintln!("progress the page showed: {seen:?}");
    let sent = browser.exec(
        "return document.getElementById('mig-sent').innerText",
        json!([]),
    );
    assert!(
        sent.as_str().unwrap().ends_with("MiB"),
        "bytes sent: {sent}"
    );
    let downtime = browser.exec(
        "return document.getElementById('mig-downtime-value').innerText",
        json!([]),
    );
    assert!(
        downtime.as_str().unwrap().ends_with("ms"),
        "downtime: {downtime}"
    );
    assert_eq!(host.vmm("db2").exit_code(BOOT), EXIT_MIGRATED);
    target.wait_state(VmState::Running, SHORT);
    browser.wait_for(
        "db2 gone from this host",
        PAGE,
        "return document.querySelector('.guest-head .state')?.innerText === 'gone'",
        json!([]),
    );
    browser.screenshot("migration-done.png");

    // (5) The guest page of web1 (for the README), then the cluster view.
    browser.goto(&web.url("/#/guest/web1"));
    browser.wait_for(
        "web1's console output",
        PAGE,
        console_has,
        json!(["hello from web1"]),
    );
    browser.resize(1400, 1800);
    browser.exec(
        "document.getElementById('messages').replaceChildren()",
        json!([]),
    );
    browser.screenshot("guest.png");
    browser.resize(1400, 1000);
    if let Some(cib) = cib {
        browser.goto(&web.url("/#/cluster"));
        browser.wait_for(
            "the cluster's nodes",
            PAGE,
            "return document.querySelectorAll('#cluster-nodes tr[data-node]').length === 2",
            json!([]),
        );
        let runs_on = browser.exec(
            "return document.querySelector('tr[data-resource-row=\"vm1\"] .nodes').innerText",
            json!([]),
        );
        let from = runs_on.as_str().unwrap().to_string();
        let to = if from == "node1" { "node2" } else { "node1" };
        browser.screenshot("cluster.png");
        browser.click("button[data-move=\"vm1\"]");
        let deadline = Instant::now() + PAGE;
        while !cib_has_move(&cib, "vm1", to) {
            assert!(
                Instant::now() < deadline,
                "Move to node never reached the CIB:\n{}",
                browser.page_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        browser.wait_for(
            "the move's confirmation",
            PAGE,
            "return document.getElementById('messages').innerText.includes('was asked to move vm1')",
            json!([]),
        );
    }
    // The list again: one guest left on this host, and where db2 went.
    browser.goto(&web.url("/"));
    browser.wait_for(
        "db2 listed as migrated away",
        PAGE,
        "return document.body.innerText.includes('db2 left this host: migration completed')",
        json!([]),
    );
}
