//! The API server over a real Unix socket, with a canned VMM behind it.

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use api::http::{
    start_server, start_server_with, ApiCall, ApiClient, ClientError, Method, ServerOptions,
    MAX_BODY_SIZE, MAX_HEAD_SIZE, REQUEST_TIMEOUT, ROUTES,
};
use api::request::{
    ApiErrorKind, ApiRequest, MigrationParameters, MigrationPhase, ReceiveMigrationRequest,
    ResumeRequest, SendMigrationRequest, ShutdownMode, ShutdownRequest, TimeoutAction, VmState,
};
use common::*;

fn client(canned: &Canned) -> ApiClient {
    ApiClient::new(canned.socket()).with_timeout(Duration::from_secs(10))
}

fn ping_ok(client: &ApiClient) {
    assert_eq!(client.ping().unwrap().pid, 4242);
}

#[test]
fn every_route_reaches_the_vmm() {
    let canned = Canned::start();
    let client = client(&canned);
    let ping = client.ping().unwrap();
    assert_eq!(
        (ping.version.as_str(), ping.pid, ping.state),
        ("0.1.0", 4242, VmState::Running)
    );
    client.create(&sample_config()).unwrap();
    client.boot().unwrap();
    let e = client.pause().unwrap_err();
    match &e {
        ClientError::Api { status, error } => {
            assert_eq!(*status, 409);
            assert_eq!(error.kind, ApiErrorKind::WrongState);
            assert_eq!(error.message, "cannot pause: the VM is created");
        }
        other => panic!("{other:?}"),
    }
    client.resume().unwrap();
    client.shutdown(&ShutdownRequest::default()).unwrap();
    let forced = ShutdownRequest {
        mode: ShutdownMode::Force,
        timeout_ms: None,
    };
    client.shutdown(&forced).unwrap();
    assert_eq!(client.info().unwrap(), sample_info());
    assert_eq!(client.counters().unwrap(), sample_counters());
    let send = SendMigrationRequest {
        destination: "tcp:127.0.0.1:6000".into(),
        token: "secret".into(),
        tls_dir: None,
        force: false,
        parameters: MigrationParameters {
            downtime_ms: 100,
            bandwidth_bytes_per_s: Some(1 << 30),
            timeout_s: Some(30),
            timeout_action: TimeoutAction::Force,
            auto_converge: false,
        },
    };
    client.send_migration(&send).unwrap();
    assert_eq!(
        client.migration_status().unwrap(),
        sample_migration_status(MigrationPhase::Completed)
    );
    client
        .migration_parameters(&MigrationParameters::default())
        .unwrap();
    client.migration_cancel().unwrap();
    let receive = ReceiveMigrationRequest {
        listen: "unix:/tmp/m.sock".into(),
        token: "secret".into(),
        tls_dir: None,
        timeout_s: None,
    };
    client.receive_migration(&receive).unwrap();
    client.shutdown_vmm().unwrap();
    assert_eq!(
        canned.seen(),
        vec![
            ApiRequest::VmmPing,
            ApiRequest::VmCreate(Box::new(sample_config())),
            ApiRequest::VmBoot,
            ApiRequest::VmPause,
            ApiRequest::VmResume(ResumeRequest::default()),
            ApiRequest::VmShutdown(ShutdownRequest::default()),
            ApiRequest::VmShutdown(forced),
            ApiRequest::VmInfo,
            ApiRequest::VmCounters,
            ApiRequest::VmSendMigration(send),
            ApiRequest::VmMigrationStatus,
            ApiRequest::VmMigrationParameters(MigrationParameters::default()),
            ApiRequest::VmMigrationCancel,
            ApiRequest::VmReceiveMigration(receive),
            ApiRequest::VmmShutdown,
        ]
    );
}

#[test]
fn statuses_follow_the_route_table() {
    let canned = Canned::start();
    let client = client(&canned);
    for route in ROUTES {
        let body = match route.name() {
            "vm.create" => Some(serde_json::to_vec(&sample_config()).unwrap()),
            "vm.send-migration" => Some(br#"{"destination": "unix:/m", "token": "t"}"#.to_vec()),
            "vm.receive-migration" => {
                Some(br#"{"listen": "tcp:[::]:6000", "token": "t"}"#.to_vec())
            }
            "vm.migration-parameters" => Some(b"{}".to_vec()),
            "vm.balloon" => Some(br#"{"target_mib": 64}"#.to_vec()),
            "vm.snapshot" => Some(br#"{"destination": "/var/lib/vmm/s"}"#.to_vec()),
            "vm.restore" => Some(br#"{"source": "/var/lib/vmm/s"}"#.to_vec()),
            _ => None,
        };
        let (status, reply) = client
            .request(route.method, route.path, body.as_deref())
            .unwrap();
        let expected = if route.name() == "vm.pause" {
            409
        } else {
            route.reply.status()
        };
        assert_eq!(status, expected, "{}", route.path);
        assert_eq!(reply.is_empty(), status == 204, "{}", route.path);
    }
}

#[test]
fn query_replies_are_json_with_a_length() {
    let canned = Canned::start();
    let reply = raw(
        &canned.socket(),
        b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
    let info: api::request::VmInfo = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(info, sample_info());
    let reply = raw(
        &canned.socket(),
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    // An action says what it did.
    assert_eq!(reply.status, 200);
    let done: api::request::ActionReply = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(done.message, "booted");
    // A query string is ignored.
    let reply = raw(
        &canned.socket(),
        b"GET /api/v1/vmm.ping?verbose=1 HTTP/1.1\r\n\r\n",
    );
    assert_eq!(reply.status, 200);
}

#[test]
fn bad_json_names_the_place() {
    let canned = Canned::start();
    let client = client(&canned);
    let api_error =
        |body: &[u8], endpoint: &str| match client.request(Method::Put, endpoint, Some(body)) {
            Ok((status, reply)) => {
                let e: api::ApiError = serde_json::from_slice(&reply).unwrap();
                (status, e)
            }
            Err(e) => panic!("{e}"),
        };
    let (status, e) = api_error(b"{\"payload\": ", "vm.create");
    assert_eq!(status, 400);
    assert_eq!(e.kind, ApiErrorKind::BadRequest);
    assert!(e.message.contains("line 1 column"), "{}", e.message);

    let (status, e) = api_error(
        br#"{"payload": {"kernel": "/k"}, "memroy": {}}"#,
        "vm.create",
    );
    assert_eq!(status, 400);
    assert!(e.message.contains("memroy"), "{}", e.message);

    let (status, e) = api_error(
        br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": "two"}}"#,
        "vm.create",
    );
    assert_eq!(status, 400);
    assert!(e.message.contains("invalid type"), "{}", e.message);

    let (status, e) = api_error(
        br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0}}"#,
        "vm.create",
    );
    assert_eq!(status, 400);
    assert!(e.message.starts_with("cpus.boot_vcpus"), "{}", e.message);

    let (status, e) = api_error(br#"{"mode": "force", "timeout": 5}"#, "vm.shutdown");
    assert_eq!(status, 400);
    assert!(e.message.contains("timeout"), "{}", e.message);

    for (body, endpoint, start) in [
        (
            &br#"{"destination": "tcp:host", "token": "t"}"#[..],
            "vm.send-migration",
            "destination: ",
        ),
        (
            br#"{"destination": "ftp:x", "token": "t"}"#,
            "vm.send-migration",
            "destination: ",
        ),
        (
            br#"{"destination": "unix:/m", "token": "t", "downtime_ms": 0}"#,
            "vm.send-migration",
            "downtime_ms: ",
        ),
        (
            br#"{"listen": "unix:", "token": "t"}"#,
            "vm.receive-migration",
            "listen: ",
        ),
        (
            br#"{"downtime_ms": 0}"#,
            "vm.migration-parameters",
            "downtime_ms: ",
        ),
    ] {
        let (status, e) = api_error(body, endpoint);
        assert_eq!(
            (status, e.kind),
            (400, ApiErrorKind::BadRequest),
            "{endpoint}"
        );
        assert!(e.message.starts_with(start), "{endpoint}: {}", e.message);
    }
    for (body, endpoint, field) in [
        (
            &br#"{"destination": "unix:/m", "token": "t", "speed": 1}"#[..],
            "vm.send-migration",
            "speed",
        ),
        (
            br#"{"listen": "unix:/m", "token": "t", "speed": 1}"#,
            "vm.receive-migration",
            "speed",
        ),
        (br#"{"speed": 1}"#, "vm.migration-parameters", "speed"),
    ] {
        let (status, e) = api_error(body, endpoint);
        assert_eq!(status, 400, "{endpoint}");
        assert!(e.message.contains(field), "{endpoint}: {}", e.message);
    }

    let (status, e) = api_error(b"\xff\xfe", "vm.create");
    assert_eq!(status, 400, "{}", e.message);
    // None of these reached the VMM.
    assert!(canned.seen().is_empty());
    ping_ok(&client);
}

#[test]
fn bodies_must_match_the_endpoint() {
    let canned = Canned::start();
    let client = client(&canned);
    let (status, reply) = client.request(Method::Put, "vm.boot", Some(b"{}")).unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&reply).contains("takes no request body"));
    let (status, _) = client.request(Method::Put, "vm.create", None).unwrap();
    assert_eq!(status, 400);
    // No Content-Length at all on an endpoint that needs a body.
    let reply = raw(&canned.socket(), b"PUT /api/v1/vm.create HTTP/1.1\r\n\r\n");
    assert_eq!(reply.status, 411);
    // Chunked bodies are not supported.
    let reply = raw(
        &canned.socket(),
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(reply.status, 411);
    assert_eq!(reply.header("connection").as_deref(), Some("close"));
    // An empty body on vm.shutdown is the default request.
    let (status, _) = client.request(Method::Put, "vm.shutdown", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        canned.seen(),
        vec![ApiRequest::VmShutdown(ShutdownRequest::default())]
    );
}

#[test]
fn oversized_bodies_are_refused_unread() {
    let canned = Canned::start();
    let client = client(&canned);
    // Announced but not sent: the server answers from the head alone.
    let reply = raw(
        &canned.socket(),
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_SIZE + 1
        )
        .as_bytes(),
    );
    assert_eq!(reply.status, 413);
    let e: api::ApiError = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(e.kind, ApiErrorKind::TooLarge);
    // Sent in full (1 MiB) by the client, which still gets the 413.
    let big = vec![b' '; 1 << 20];
    let (status, _) = client
        .request(Method::Put, "vm.create", Some(&big))
        .unwrap();
    assert_eq!(status, 413);
    let e = client.create_json(&big).unwrap_err();
    assert!(matches!(e, ClientError::Api { status: 413, .. }), "{e:?}");
    // A body just at the limit is read (and is bad JSON).
    let mut body = vec![b' '; MAX_BODY_SIZE];
    body[0] = b'{';
    let (status, _) = client
        .request(Method::Put, "vm.create", Some(&body))
        .unwrap();
    assert_eq!(status, 400);
    ping_ok(&client);
}

#[test]
fn unknown_paths_and_wrong_methods() {
    let canned = Canned::start();
    let client = client(&canned);
    let (status, reply) = client.request(Method::Get, "vm.nope", None).unwrap();
    assert_eq!(status, 404);
    let e: api::ApiError = serde_json::from_slice(&reply).unwrap();
    assert_eq!(e.kind, ApiErrorKind::NotFound);
    assert_eq!(client.request(Method::Get, "/", None).unwrap().0, 404);
    assert_eq!(
        client.request(Method::Get, "/api/v1/", None).unwrap().0,
        404
    );

    let reply = raw(&canned.socket(), b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n");
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow").as_deref(), Some("PUT"));
    let e: api::ApiError = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(e.kind, ApiErrorKind::MethodNotAllowed);
    let reply = raw(&canned.socket(), b"DELETE /api/v1/vm.info HTTP/1.1\r\n\r\n");
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow").as_deref(), Some("GET"));
    let reply = raw(&canned.socket(), b"BREW /api/v1/vm.info HTTP/1.1\r\n\r\n");
    assert_eq!(reply.status, 405);
    assert!(canned.seen().is_empty());
}

#[test]
fn garbage_gets_400_and_the_server_goes_on() {
    let canned = Canned::start();
    let client = client(&canned);
    for garbage in [
        &b"hello\r\n\r\n"[..],
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"GET / HTTP/1.1\r\nno-colon-here\r\n\r\n",
        b"GET /api/v1/vmm.ping\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
    ] {
        let mut stream = connect(&canned.socket());
        stream.write_all(garbage).unwrap();
        let reply = read_reply(&mut stream, &mut Vec::new()).expect("a reply");
        assert_eq!(reply.status, 400, "{garbage:?}: {reply:?}");
        assert!(closed(&mut stream), "{garbage:?}");
    }
    let reply = raw(&canned.socket(), b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n");
    assert_eq!(reply.status, 505);
    // Binary noise without a line end, past the head limit.
    let reply = raw(&canned.socket(), &vec![0xAA; MAX_HEAD_SIZE + 100]);
    assert_eq!(reply.status, 431);
    ping_ok(&client);
}

#[test]
fn huge_heads_get_431() {
    let canned = Canned::start();
    let mut request = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    for i in 0..400 {
        request.extend_from_slice(format!("X-Padding-{i}: {}\r\n", "y".repeat(20)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    assert!(request.len() > MAX_HEAD_SIZE);
    let reply = raw(&canned.socket(), &request);
    assert_eq!(reply.status, 431);
    ping_ok(&client(&canned));
}

#[test]
fn clients_that_hang_up_mid_request_do_not_matter() {
    let canned = Canned::start();
    let client = client(&canned);
    for partial in [
        &b"GET /api/v1/vmm.pi"[..],
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"payload\"",
        b"PUT /api/v1/vm.boot HTTP/1.1\r\n",
    ] {
        let mut stream = connect(&canned.socket());
        stream.write_all(partial).unwrap();
        drop(stream);
    }
    // One that hangs up before its answer is written.
    let mut stream = connect(&canned.socket());
    stream
        .write_all(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n")
        .unwrap();
    drop(stream);
    ping_ok(&client);
    assert!(canned
        .seen()
        .iter()
        .all(|r| matches!(r, ApiRequest::VmInfo | ApiRequest::VmmPing)));
}

#[test]
fn keep_alive_and_pipelining() {
    let canned = Canned::start();
    let mut stream = connect(&canned.socket());
    let mut pending = Vec::new();
    for _ in 0..3 {
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let reply = read_reply(&mut stream, &mut pending).unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("connection"), None);
    }
    // Errors that keep the framing intact keep the connection too.
    stream
        .write_all(b"GET /api/v1/nope HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 404);
    stream
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 400);
    // Three requests in one write, the last one closing.
    stream
        .write_all(
            b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 0\r\n\r\n\
              PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"mode\": \"force\"}\
              GET /api/v1/vm.counters HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 200);
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 200);
    let last = read_reply(&mut stream, &mut pending).unwrap();
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection").as_deref(), Some("close"));
    assert!(closed(&mut stream));
    assert_eq!(canned.seen().len(), 6);
}

#[test]
fn http_1_0_closes_unless_asked_not_to() {
    let canned = Canned::start();
    let mut stream = connect(&canned.socket());
    stream
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_reply(&mut stream, &mut Vec::new()).unwrap().status,
        200
    );
    assert!(closed(&mut stream));
    let mut stream = connect(&canned.socket());
    let mut pending = Vec::new();
    stream
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 200);
    stream
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 200);
}

#[test]
fn expect_continue_is_honoured() {
    let canned = Canned::start();
    let mut stream = connect(&canned.socket());
    let body = serde_json::to_vec(&sample_config()).unwrap();
    stream
        .write_all(
            format!(
                "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 100);
    stream.write_all(&body).unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 204);
    assert_eq!(
        canned.seen(),
        vec![ApiRequest::VmCreate(Box::new(sample_config()))]
    );
}

#[test]
fn slow_clients_time_out() {
    let dir = TempDir::new();
    let options = ServerOptions {
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..ServerOptions::default()
    };
    let _server = start_server_with(&dir.socket(), options, |call: ApiCall| {
        let _ = call.reply.send(common::canned_answer(&call.request));
    })
    .unwrap();
    // Slowloris: a head that never ends.
    let mut stream = connect(&dir.socket());
    let started = Instant::now();
    stream
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-A: 1\r\n")
        .unwrap();
    let reply = read_reply(&mut stream, &mut Vec::new()).unwrap();
    assert_eq!(reply.status, 408);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A body that never comes.
    let mut stream = connect(&dir.socket());
    stream
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    assert_eq!(
        read_reply(&mut stream, &mut Vec::new()).unwrap().status,
        408
    );
    // An idle keep-alive connection is closed quietly.
    let mut stream = connect(&dir.socket());
    let mut pending = Vec::new();
    stream
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut stream, &mut pending).unwrap().status, 200);
    let idle = Instant::now();
    assert!(closed(&mut stream));
    assert!(idle.elapsed() >= Duration::from_millis(400));
    let client = ApiClient::new(dir.socket());
    assert_eq!(client.ping().unwrap().pid, 4242);
}

#[test]
fn dropped_or_failed_calls_answer_500() {
    let dir = TempDir::new();
    let _server = start_server(&dir.socket(), |call: ApiCall| match call.request {
        ApiRequest::VmBoot => drop(call.reply),
        ApiRequest::VmPause => panic!("the dispatch fails"),
        request => {
            let _ = call.reply.send(common::canned_answer(&request));
        }
    })
    .unwrap();
    let client = ApiClient::new(dir.socket());
    let e = client.boot().unwrap_err();
    match e {
        ClientError::Api { status, error } => {
            assert_eq!(status, 500);
            assert_eq!(error.kind, ApiErrorKind::Internal);
            assert!(
                error.message.contains("without answering"),
                "{}",
                error.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.pause().unwrap_err(),
        ClientError::Api { status: 500, .. }
    ));
    assert_eq!(client.ping().unwrap().pid, 4242);
}

#[test]
fn answers_may_come_from_another_thread_later() {
    let dir = TempDir::new();
    let (tx, rx) = mpsc::channel::<ApiCall>();
    let tx = std::sync::Mutex::new(tx);
    let server = start_server(&dir.socket(), move |call| {
        let _ = tx.lock().unwrap().send(call);
    })
    .unwrap();
    // The "control loop": answers each call after a while.
    let vmm = thread::spawn(move || {
        for call in rx {
            thread::sleep(Duration::from_millis(200));
            let _ = call.reply.send(common::canned_answer(&call.request));
        }
    });
    let path = dir.socket();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            thread::spawn(move || ApiClient::new(path).ping().map(|p| p.pid))
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), 4242);
    }
    // Shutting down while a request is with the VMM still delivers its answer.
    let path2 = path.clone();
    let pending = thread::spawn(move || ApiClient::new(path2).boot());
    thread::sleep(Duration::from_millis(50));
    server.shutdown();
    pending.join().unwrap().unwrap();
    assert!(!path.exists());
    vmm.join().unwrap();
}

#[test]
fn shutdown_and_drop_remove_the_socket() {
    let canned = Canned::start();
    let path = canned.socket();
    assert!(canned.server.is_running());
    assert_eq!(canned.server.socket_path(), path);
    let client = client(&canned);
    // An idle keep-alive connection does not hold the shutdown up.
    let mut idle = connect(&path);
    idle.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut idle, &mut Vec::new()).unwrap().status, 200);
    let started = Instant::now();
    let Canned { dir, server, .. } = canned;
    server.shutdown();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!path.exists());
    assert!(closed(&mut idle));
    let e = client.ping().unwrap_err();
    assert!(matches!(e, ClientError::NotListening { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("no VMM is listening on {}", path.display())
    );
    assert!(e.is_unreachable());

    let server = start_server(&path, |_| {}).unwrap();
    assert!(path.exists());
    drop(server);
    assert!(!path.exists());
    drop(dir);
}

#[test]
fn stale_sockets_are_replaced() {
    let dir = TempDir::new();
    let path = dir.socket();
    // A socket file nobody listens on, as a killed VMM leaves behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let e = ApiClient::new(&path).ping().unwrap_err();
    assert!(matches!(e, ClientError::NotListening { .. }), "{e:?}");
    let _server = start_server(&path, |call: ApiCall| {
        let _ = call.reply.send(common::canned_answer(&call.request));
    })
    .unwrap();
    assert_eq!(ApiClient::new(&path).ping().unwrap().pid, 4242);
}

#[test]
fn live_sockets_and_other_files_are_not_taken() {
    let canned = Canned::start();
    let e = start_server(&canned.socket(), |_| {}).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert!(
        e.to_string().contains("is in use by another process"),
        "{e}"
    );
    // The first server is untouched.
    ping_ok(&client(&canned));

    let dir = TempDir::new();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let e = start_server(&file, |_| {}).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let e = start_server(&dir.path().join("no/such/dir/api.sock"), |_| {}).unwrap_err();
    assert!(e.to_string().contains("no/such/dir/api.sock"), "{e}");
}

#[test]
fn a_replaced_socket_is_not_removed_by_the_old_server() {
    let dir = TempDir::new();
    let path = dir.socket();
    let old = start_server(&path, |_| {}).unwrap();
    // Someone removes our socket and another VMM binds the path.
    std::fs::remove_file(&path).unwrap();
    let new = start_server(&path, |call: ApiCall| {
        let _ = call.reply.send(common::canned_answer(&call.request));
    })
    .unwrap();
    drop(old);
    assert!(path.exists());
    assert_eq!(ApiClient::new(&path).ping().unwrap().pid, 4242);
    drop(new);
}

#[test]
fn idle_connections_make_room_for_new_ones() {
    let dir = TempDir::new();
    let options = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    let _server = start_server_with(&dir.socket(), options, |call: ApiCall| {
        let _ = call.reply.send(common::canned_answer(&call.request));
    })
    .unwrap();
    // A half-sent request, then two kept-alive connections idle after a
    // request: the second of those already closes the half-sent one.
    let mut half = connect(&dir.socket());
    half.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-A:")
        .unwrap();
    let mut held: Vec<_> = (0..2).map(|_| connect(&dir.socket())).collect();
    for stream in &mut held {
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        assert_eq!(read_reply(stream, &mut Vec::new()).unwrap().status, 200);
    }
    // Each newcomer closes the one waiting longest, long before the request
    // timeout would have.
    let mut newcomers = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&dir.socket());
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        assert_eq!(
            read_reply(&mut stream, &mut Vec::new()).unwrap().status,
            200
        );
        newcomers.push(stream);
    }
    for stream in held.iter_mut().chain([&mut half]) {
        stream.set_read_timeout(Some(REQUEST_TIMEOUT / 2)).unwrap();
        assert!(closed(stream));
    }
}

#[test]
fn connections_busy_with_the_vmm_refuse_new_ones_with_503() {
    let dir = TempDir::new();
    let options = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    // The "VMM" answers nothing until told to.
    let (tx, rx) = mpsc::channel::<ApiCall>();
    let tx = std::sync::Mutex::new(tx);
    let _server = start_server_with(&dir.socket(), options, move |call: ApiCall| {
        let _ = tx.lock().unwrap().send(call);
    })
    .unwrap();
    let mut busy: Vec<_> = (0..2).map(|_| connect(&dir.socket())).collect();
    let mut calls = Vec::new();
    for stream in &mut busy {
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        calls.push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    let reply = raw(&dir.socket(), b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
    assert_eq!(reply.status, 503);
    // Answered, they make room again.
    for (call, stream) in calls.into_iter().zip(&mut busy) {
        let _ = call.reply.send(common::canned_answer(&call.request));
        assert_eq!(read_reply(stream, &mut Vec::new()).unwrap().status, 200);
    }
    let answer = thread::spawn(move || {
        let call = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let _ = call.reply.send(common::canned_answer(&call.request));
    });
    assert_eq!(ApiClient::new(dir.socket()).ping().unwrap().pid, 4242);
    answer.join().unwrap();
}

#[test]
fn the_client_reports_what_went_wrong() {
    let dir = TempDir::new();
    let path = dir.socket();
    // Nothing there.
    let e = ApiClient::new(&path).ping().unwrap_err();
    assert!(matches!(e, ClientError::NotListening { .. }), "{e:?}");
    // Something that accepts but never answers.
    let listener = UnixListener::bind(&path).unwrap();
    let e = ApiClient::new(&path)
        .with_timeout(Duration::from_millis(200))
        .ping()
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
    assert!(e.is_unreachable());
    drop(listener.accept().unwrap());
    // Something that answers nonsense.
    let nonsense = thread::spawn(move || {
        for reply in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ] {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            stream.write_all(reply).unwrap();
        }
    });
    let client = ApiClient::new(&path);
    let e = client.ping().unwrap_err();
    assert!(matches!(e, ClientError::BadReply { .. }), "{e:?}");
    let e = client.info().unwrap_err();
    assert!(matches!(e, ClientError::BadReply { .. }), "{e:?}");
    nonsense.join().unwrap();
    // Bad endpoints never leave the client.
    let e = client
        .request(Method::Get, "vm.info HTTP/1.1\r\nX: y", None)
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidRequest(_)), "{e:?}");
}
