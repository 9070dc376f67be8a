//! HTTP/1.1 message framing shared by the server and the client.

/// Where the head of a message (start line and headers) lies in `buf`:
/// `(start, end)`, `start` past any empty lines before the start line (which
/// RFC 9112 says to ignore), `end` just past the empty line that closes the
/// head. None while the head is incomplete. Lines may end in CRLF or a bare LF.
pub(crate) fn find_head(buf: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    // Skip empty lines before the start line.
    loop {
        match buf.get(start..) {
            Some([b'\n', ..]) => start += 1,
            Some([b'\r', b'\n', ..]) => start += 2,
            _ => break,
        }
    }
    let mut line = start;
    while let Some(pos) = buf[line..].iter().position(|&b| b == b'\n') {
        let end = line + pos;
        let text = &buf[line..end];
        if line > start && (text.is_empty() || text == b"\r") {
            return Some((start, end + 1));
        }
        line = end + 1;
    }
    None
}

/// A start line and its headers.
pub(crate) type SplitHead<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// What is wrong with a message head.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("the message head is not UTF-8")]
    NotUtf8,
    #[error("empty message head")]
    Empty,
    #[error("folded header lines are not supported")]
    Folded,
    #[error("header line {0:?} has no colon")]
    NoColon(String),
    #[error("bad header name {0:?}")]
    BadName(String),
}

/// A message head split into its start line and `(name, value)` headers
/// (values trimmed). Fails on text that is not UTF-8, on folded header lines
/// and on lines without a colon.
pub(crate) fn split_head(head: &[u8]) -> Result<SplitHead<'_>, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::NotUtf8)?;
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty());
    let first = lines.next().ok_or(HeadError::Empty)?;
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(HeadError::Folded);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HeadError::NoColon(clip(line)))?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(HeadError::BadName(clip(name)));
        }
        headers.push((name, value.trim_matches([' ', '\t'])));
    }
    Ok((first, headers))
}

/// RFC 9110 `tchar`: what a method or header name is made of.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A Content-Length value: digits only, no sign, no overflow.
pub(crate) fn parse_content_length(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Whether a comma-separated header value (Connection) holds `token`.
pub(crate) fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// At most 60 characters of `text`, for error messages.
pub(crate) fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(60).collect();
    if out.len() < text.len() {
        out.push_str("...");
    }
    out
}

/// The reason phrase of a status code.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_ends_at_the_first_empty_line() {
        assert_eq!(
            find_head(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
            Some((0, 24))
        );
        assert_eq!(find_head(b"GET / HTTP/1.1\nA: b\n\nbody"), Some((0, 21)));
        assert_eq!(find_head(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Some((4, 22)));
        assert_eq!(find_head(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(find_head(b""), None);
        assert_eq!(find_head(b"\r\n"), None);
    }

    #[test]
    fn heads_split_into_headers() {
        let (first, headers) =
            split_head(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length:  12 \r\n\r\n").unwrap();
        assert_eq!(first, "PUT /x HTTP/1.1");
        assert_eq!(headers, vec![("Host", "a"), ("Content-Length", "12")]);
        assert!(split_head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n").is_err());
        assert!(split_head(b"GET / HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n").is_err());
        assert!(split_head(b"GET / HTTP/1.1\r\nBad Name: b\r\n\r\n").is_err());
        assert!(split_head(b"GET / HTTP/1.1\r\n\xff: b\r\n\r\n").is_err());
    }

    #[test]
    fn content_lengths_are_plain_digits() {
        assert_eq!(parse_content_length("0"), Some(0));
        assert_eq!(parse_content_length("65536"), Some(65536));
        assert_eq!(parse_content_length("+1"), None);
        assert_eq!(parse_content_length("-1"), None);
        assert_eq!(parse_content_length(""), None);
        assert_eq!(parse_content_length("99999999999999999999999"), None);
        assert!(has_token("keep-alive, Close", "close"));
        assert!(!has_token("closed", "close"));
    }
}
