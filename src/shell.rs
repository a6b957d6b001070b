//! POSIX shell quoting: the only way ferry builds a remote command line.
//!
//! sshd runs every exec string through the user's login shell, so each argument is quoted as bytes
//! (paths may be non-UTF-8, contain spaces, quotes, `$(...)` or newlines) and joined.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

#[derive(Debug, thiserror::Error)]
#[error("argument contains a NUL byte, which no shell command can carry")]
pub struct NulError;

/// Quote one argument for a POSIX shell.
pub fn quote(arg: &[u8]) -> Result<Vec<u8>, NulError> {
    if arg.contains(&0) {
        return Err(NulError);
    }
    if !arg.is_empty()
        && arg
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%^".contains(b))
    {
        return Ok(arg.to_vec());
    }
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'\'');
    for &b in arg {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    Ok(out)
}

/// Quote a UTF-8 argument; NUL cannot appear in strings ferry builds from the playbook.
pub fn quote_str(arg: &str) -> String {
    String::from_utf8(quote(arg.as_bytes()).unwrap_or_else(|_| b"''".to_vec()))
        .expect("quoting keeps UTF-8")
}

/// Join an argv into one command line, each element quoted.
pub fn join<I, S>(argv: I) -> Result<Vec<u8>, NulError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut out = Vec::new();
    for (i, a) in argv.into_iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend(quote(a.as_ref().as_bytes())?);
    }
    Ok(out)
}

/// [`join`] for UTF-8 argv.
pub fn join_str<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| quote_str(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Round-trip through a real `sh`: what we quote must arrive byte for byte.
    #[test]
    fn round_trips_hostile_bytes_through_sh() {
        let cases: Vec<&[u8]> = vec![
            b"plain",
            b"",
            b"with space",
            b"it's",
            b"$(touch /tmp/ferry-pwned)",
            b"`id`",
            b"line\nbreak",
            b"\xff\xfe non-utf8",
            b"'\"\\",
            b"-n",
            b"*",
        ];
        for c in cases {
            let script = [b"printf '%s' ".as_slice(), &quote(c).unwrap()].concat();
            let out = Command::new("sh")
                .arg("-c")
                .arg(OsStr::from_bytes(&script))
                .output()
                .unwrap();
            assert_eq!(out.stdout, c, "case {:?}", String::from_utf8_lossy(c));
        }
    }

    #[test]
    fn nul_is_refused() {
        assert!(quote(b"a\0b").is_err());
    }

    #[test]
    fn join_quotes_each() {
        assert_eq!(join_str(&["echo", "a b", "c"]), "echo 'a b' c");
    }
}
