//! Driving `vmm-web` from tests: the process, a small HTTP/1.1 client (with
//! the headers a browser or an attacker would send), and a WebDriver client
//! for Debian's `chromium` through `chromedriver`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::workspace_binary;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether the browser tests can run: false (with the reason printed) when
/// there is no chromium. With chromium but without its driver the tests
/// fail: resources/test.sh installs both.
pub fn browser_available() -> bool {
    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "SKIP: {CHROMIUM} is missing (Debian packages chromium and chromium-driver; \
             resources/test.sh installs them)"
        );
        return false;
    }
    assert!(
        Path::new(CHROMEDRIVER).exists(),
        "{CHROMIUM} is installed but {CHROMEDRIVER} is not: apt-get install chromium-driver"
    );
    true
}

/// Where the tests save screenshots: `target/web-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test binary>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binaries live in target/<profile>/deps");
    let dir = target.join("web-screenshots");
    std::fs::create_dir_all(&dir).expect("the screenshot directory");
    dir
}

/// A running `vmm-web`.
pub struct WebConsole {
    child: Child,
    /// `127.0.0.1:PORT` as it reported it.
    pub addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl WebConsole {
    /// Starts `vmm-web ARGS` with extra environment and waits until it
    /// serves (pass `--listen ADDR:0` for any free port).
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> WebConsole {
        let mut web = WebConsole::launch(args, env);
        web.addr = web
            .addr
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("vmm-web serves {:?}, not TCP", web.addr))
            .to_string();
        web
    }

    /// Starts `vmm-web --listen unix:SOCKET ARGS` and waits until it serves.
    pub fn start_unix(socket: &Path, args: &[&str]) -> WebConsole {
        let listen = format!("unix:{}", socket.display());
        let mut all = vec!["--listen", listen.as_str()];
        all.extend_from_slice(args);
        let web = WebConsole::launch(&all, &[]);
        assert!(web.addr.starts_with("unix:"), "{}", web.addr);
        web
    }

    /// Spawns it; `addr` is what follows "vmm-web: serving " on stderr.
    fn launch(args: &[&str], env: &[(&str, &str)]) -> WebConsole {
        let mut child = Command::new(workspace_binary("vmm-web"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmm-web starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = BufReader::new(child.stderr.take().unwrap());
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if std::env::var_os("VMM_TEST_ECHO").is_some() {
                    eprintln!("vmm-web| {line}");
                }
                if let Some(rest) = line.strip_prefix("vmm-web: serving ") {
                    let served = rest.split(' ').next().unwrap_or_default().to_string();
                    let _ = tx.send(served);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "vmm-web did not start serving:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        };
        WebConsole {
            child,
            addr,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http(&self.addr, "GET", path, headers, None)
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        http(&self.addr, "POST", path, headers, Some(body.as_bytes()))
    }
}

impl Drop for WebConsole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `vmm-web ARGS` expecting it to refuse to start: its exit code and
/// error output.
pub fn web_refuses(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(workspace_binary("vmm-web"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm-web starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmm-web {args:?} did not exit: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP reply.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `name=value` of the cookie this reply sets.
    pub fn cookie(&self) -> Option<String> {
        self.header("set-cookie")
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
    }
}

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

fn request_head(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head
}

fn parse_head(text: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// One HTTP/1.1 request (`Connection: close`); the whole reply.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    exchange(connect(addr), addr, method, path, headers, body)
}

/// One HTTP/1.1 request over a Unix socket (Host: localhost).
pub fn http_unix(socket: &Path, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    exchange(stream, "localhost", method, path, headers, None)
}

fn exchange(
    mut stream: impl Read + Write,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    stream
        .write_all(request_head(addr, method, path, headers, body).as_bytes())
        .unwrap();
    if let Some(body) = body {
        stream.write_all(body).unwrap();
    }
    // Read the head, then the body by its length, chunks, or to the end
    // (a server may keep the connection open despite `Connection: close`).
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let (status, headers) = parse_head(&head);
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(length) = find("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(length, 0);
        reader
            .read_exact(&mut body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let size =
                usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).unwrap();
            let mut crlf = String::new();
            reader.read_line(&mut crlf).unwrap();
        }
    } else if status != 204 && status != 304 && method != "HEAD" {
        reader
            .read_to_end(&mut body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }
    Response {
        status,
        headers,
        body,
    }
}

/// Opens an event stream and returns the data of the first event named
/// `event` (with its status and headers).
pub fn first_event(addr: &str, path: &str, headers: &[(&str, &str)], event: &str) -> (u16, String) {
    let mut stream = connect(addr);
    stream
        .write_all(request_head(addr, "GET", path, headers, None).as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let (status, _) = parse_head(&head);
    if status != 200 {
        return (status, String::new());
    }
    // The body is chunked; event lines are plain text inside the chunks.
    let mut current = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("event: ") {
            current = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            if current == event {
                return (status, data.to_string());
            }
        }
    }
    panic!("no {event:?} event on {path}");
}

/// Decodes standard base64 (screenshots).
pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// `chromedriver` and one headless `chromium` session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: crate::harness::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts chromedriver (any free port) and a headless chromium with the
    /// flags that keep it off the network (no background lookups).
    pub fn start() -> Browser {
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut reader = BufReader::new(driver.stdout.take().unwrap());
        let mut port = None;
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                port = rest.trim().trim_end_matches('.').parse().ok();
                break;
            }
            line.clear();
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let port = port.expect("chromedriver reports its port");
        let profile = crate::harness::TempDir::new("chromium");
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1400,1000".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let reply = browser.call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                "timeouts": {"pageLoad": 60000, "script": 30000, "implicit": 0}
            }}})),
        );
        browser.session = reply["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {reply}"))
            .to_string();
        browser
    }

    /// A WebDriver command; its `value`. Panics with the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let addr = format!("127.0.0.1:{}", self.port);
        let body = body.map(|b| b.to_string());
        let reply = http(
            &addr,
            method,
            path,
            &[],
            body.as_deref().map(str::as_bytes).or(match method {
                "POST" => Some(b"{}".as_slice()),
                _ => None,
            }),
        );
        let value = reply.json()["value"].clone();
        assert!(
            reply.status == 200,
            "WebDriver {method} {path}: {} {value}",
            reply.status
        );
        value
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn current_url(&self) -> String {
        self.session_call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub fn exec(&self, script: &str, args: Value) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Waits until `script` returns a truthy value; returns it. Panics
    /// with `what` and the page's text on timeout.
    pub fn wait_for(&self, what: &str, timeout: Duration, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.exec(script, args.clone());
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "the page never showed {what} within {timeout:?}; it shows:\n{}",
                    self.page_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn page_text(&self) -> String {
        self.exec("return document.body.innerText", json!([]))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn element(&self, css: &str) -> String {
        let found = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    /// Clicks the element `css` (a real click, as a user's).
    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/click"), None);
    }

    /// Types `text` into the element `css` (after clearing it).
    pub fn fill(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/clear"), None);
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Sets the window's size (the screenshot's size).
    pub fn resize(&self, width: u32, height: u32) {
        self.session_call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// Saves a screenshot of the window as `dir/name`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.session_call("GET", "/screenshot", None);
        let bytes = base64_decode(png.as_str().expect("a base64 PNG"));
        assert!(bytes.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let path = screenshot_dir().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let addr = format!("127.0.0.1:{}", self.port);
            let path = format!("/session/{}", self.session);
            // Ends chromium; a driver that already died is fine.
            if TcpStream::connect(&addr).is_ok() {
                let _ = std::panic::catch_unwind(|| http(&addr, "DELETE", &path, &[], None));
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        kill_profile_processes(self._profile.path());
    }
}

/// Kills the chromium processes started with this (unique, temporary)
/// profile: a session that never started, or a driver that died, leaves
/// them running otherwise (chromedriver's exit does not end them).
fn kill_profile_processes(profile: &Path) {
    let flag = format!("--user-data-dir={}", profile.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(|arg| arg == flag.as_bytes()) {
            // SAFETY: kill(2) on a pid whose command line names our profile.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
        assert_eq!(base64_decode("iVBORw=="), b"\x89PNG");
    }
}
