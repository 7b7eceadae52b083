//! `mqttq passwd`: adds or replaces a user in a password file for `mqttq broker
//! --password-file` (PBKDF2-SHA256 with a random salt, like mosquitto_passwd).
//!
//! The password is read from the terminal without echo (asked twice), or as one line from
//! stdin when that is not a terminal. The file is written readable by its owner only (0600),
//! through a temporary file renamed into place, so a reader never sees half a file.

use clap::Args;
use mqtt_quic_core::broker::auth::FileAuth;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
use std::path::PathBuf;

/// PBKDF2 rounds for new entries.
const ITERATIONS: u32 = mqtt_quic_core::broker::auth::DEFAULT_ITERATIONS;

/// `mqttq passwd` arguments.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// The password file (created if missing).
    file: PathBuf,
    /// The user to add or update.
    user: String,
    /// The password [default: asked on the terminal without echo, or one line from stdin].
    /// (Given here it shows in the process list and shell history.)
    password: Option<String>,
    /// Remove the user instead.
    #[arg(short = 'D', long, conflicts_with = "password")]
    delete: bool,
}

/// 16 salt bytes from the standard library's per-process random hash keys.
fn salt() -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// Rewrites the file with the user's entry added, replaced or removed.
pub fn run(args: PasswdArgs) -> Result<(), String> {
    if args.user.is_empty() || args.user.contains(':') {
        return Err(format!("bad user name `{}` (it must be non-empty and have no `:`)", args.user));
    }
    let existing = match std::fs::read_to_string(&args.file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", args.file.display())),
    };
    let prefix = format!("{}:", args.user);
    let mut lines: Vec<String> = existing.lines().filter(|l| !l.starts_with(&prefix)).map(str::to_string).collect();
    if !args.delete {
        let password = match args.password {
            Some(p) => p,
            None => read_password()?,
        };
        let rounds = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
        lines.push(FileAuth::hash_password(&args.user, &password, salt(), rounds));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    // The result must load: the broker would refuse it otherwise.
    FileAuth::new(false).with_passwords(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    write_private(&args.file, &text).map_err(|e| format!("cannot write {}: {e}", args.file.display()))
}

/// One line of stdin, with the terminal's echo off when stdin is a terminal (asked twice
/// there, as mosquitto_passwd does).
fn read_password() -> Result<String, String> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    let read = || {
        let mut line = String::new();
        stdin.read_line(&mut line).map_err(|e| format!("stdin: {e}"))?;
        Ok::<_, String>(line.trim_end_matches(['\r', '\n']).to_string())
    };
    if !stdin.is_terminal() {
        return read();
    }
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !stty("-echo") {
        return Err("cannot turn off the terminal's echo (no stty?); give the password on stdin instead".into());
    }
    eprint!("Password: ");
    let first = read();
    eprint!("\nReenter password: ");
    let second = read();
    stty("echo");
    eprintln!();
    let (first, second) = (first?, second?);
    if first != second {
        return Err("the passwords do not match".into());
    }
    Ok(first)
}

/// Writes `text` to `path` readable and writable by its owner only, replacing it atomically.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    // A new file: never one that is there already (or a link someone put in its place).
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
    drop(file);
    match written {
        Ok(()) => std::fs::rename(&tmp, path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
