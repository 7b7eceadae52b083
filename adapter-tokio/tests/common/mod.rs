//! What the tests that run `mqttq` as a subprocess share.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;

/// The child's stdout, line by line, on a channel (read on a thread of its own, so a test can
/// wait for a line with a deadline).
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}
