//! `mqttq passwd`: adds or replaces a user in a password file for `mqttq broker
//! --password-file` (PBKDF2-SHA256 with a random salt, like mosquitto_passwd).

use clap::Args;
use mqtt_quic_core::broker::auth::FileAuth;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
use std::path::PathBuf;

/// PBKDF2 rounds for new entries.
const ITERATIONS: u32 = 100_000;

/// `mqttq passwd` arguments.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// The password file (created if missing).
    file: PathBuf,
    /// The user to add or update.
    user: String,
    /// The password [default: read one line from stdin].
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
            None => {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map_err(|e| format!("stdin: {e}"))?;
                line.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        let rounds = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
        lines.push(FileAuth::hash_password(&args.user, &password, salt(), rounds));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    // The result must load: the broker would refuse it otherwise.
    FileAuth::new(false).with_passwords(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    std::fs::write(&args.file, text).map_err(|e| format!("cannot write {}: {e}", args.file.display()))
}
