//! The API server's request parser and router: pipelined requests in one
//! buffer, each parsed as the server does, routed, and its JSON body turned
//! into an `ApiRequest`. Nothing may panic; a parsed request never takes
//! more bytes than there are, nor none.
#![no_main]

use api::http::server::{api_request, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    // A connection's requests, until one is refused or incomplete.
    while let Ok(Some((request, used))) = parse_request(buf) {
        assert!(
            used > 0 && used <= buf.len(),
            "took {used} of {} bytes",
            buf.len()
        );
        assert!(request.body.len() <= api::http::MAX_BODY_SIZE);
        if let Err((status, body)) = api_request(&request) {
            assert!((400..600).contains(&status), "status {status}");
            assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        }
        buf = &buf[used..];
    }
    if let Err((status, _)) = parse_request(buf) {
        assert!((400..600).contains(&status), "status {status}");
    }
});
