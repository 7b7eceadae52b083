//! Keeps `CONFORMANCE.md` honest.
//!
//! That file has one table row per normative statement of MQTT 5.0 (`| id | binds | requirement |
//! enforced in | test |`). Its last cell names the tests that check the statement, as
//! `` `path/from/repo/root.rs::test_name` `` separated by `<br>` or `, `, or it explains why there
//! is none yet (`not yet: …`) or why the statement does not apply to us (`n/a: …`).
//!
//! These tests read the file and fail, listing every problem at once, when:
//! - a named test does not exist: the file is missing, or it has no function of that name marked
//!   `#[test]`, `#[tokio::test]` or `#[async_std::test]` (or defined in a `proptest!` block);
//! - a row is undecided (empty or free-form test cell), an id appears twice, or the counts in the
//!   summary table no longer match the rows;
//! - the rows are not in the standard's order.
//!
//! They do not judge whether a test really exercises its statement; that is for the reviewer.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The file under test.
const TABLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../CONFORMANCE.md");

/// Attributes that make a function a test.
const TEST_ATTRIBUTES: [&str; 3] = ["#[test]", "#[tokio::test", "#[async_std::test"];

/// The values of the `binds` column.
const BINDS: [&str; 5] = ["server", "client", "both", "sender", "receiver"];

/// `binds` values that oblige the server (a sender or receiver can be the server).
const BINDS_THE_SERVER: [&str; 4] = ["server", "both", "sender", "receiver"];

/// Fewer rows than this means part of the table was lost.
const MIN_ROWS: usize = 240;

/// One statement row of the table.
struct Row {
    /// 1-based line number in `CONFORMANCE.md`.
    line: usize,
    /// The statement id without brackets, e.g. `MQTT-3.1.2-24`.
    id: String,
    /// Every cell of the row, trimmed.
    cells: Vec<String>,
}

impl Row {
    /// The `binds` cell (empty if the row is too short).
    fn binds(&self) -> &str {
        self.cells.get(1).map_or("", String::as_str)
    }

    /// The last cell: tests, `not yet: …` or `n/a: …`.
    fn test_cell(&self) -> &str {
        self.cells.last().map_or("", String::as_str)
    }

    /// Where the row is, for messages.
    fn at(&self) -> String {
        format!("CONFORMANCE.md:{} ({})", self.line, self.id)
    }
}

/// What a row's test cell says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Checked by the named tests.
    Tested,
    /// No test yet, with a reason.
    NotYet,
    /// Does not apply to us, with a reason.
    NotApplicable,
}

/// A test named in a cell: `path/from/repo/root.rs::name`.
struct TestRef<'a> {
    path: &'a str,
    name: &'a str,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_table() -> String {
    fs::read_to_string(TABLE).unwrap_or_else(|e| panic!("cannot read {TABLE}: {e}"))
}

/// The trimmed cells of a Markdown table line, or `None` for any other line.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The statement id in a first cell (`MQTT-1.5.4-1` or `[MQTT-1.5.4-1]`), if it is one.
fn statement_id(cell: &str) -> Option<&str> {
    let id = cell.strip_prefix('[').unwrap_or(cell);
    let id = id.strip_suffix(']').unwrap_or(id);
    id.starts_with("MQTT-").then_some(id)
}

/// Every row whose first cell is a statement id.
fn rows(text: &str) -> Vec<Row> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let parts = cells(line)?;
            let id = statement_id(parts.first()?)?.to_owned();
            Some(Row { line: i + 1, id, cells: parts.into_iter().map(str::to_owned).collect() })
        })
        .collect()
}

/// The numbers of an id (`MQTT-4.3.3-10` → `[4, 3, 3, 10]`), or `None` if it is not of that form.
fn id_numbers(id: &str) -> Option<Vec<u32>> {
    let numbers = id.strip_prefix("MQTT-")?;
    numbers.split(['.', '-']).map(|n| n.parse().ok()).collect()
}

/// Every backticked `path.rs::name` in a cell.
fn references(cell: &str) -> Vec<TestRef<'_>> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| {
            let at = span.find(".rs::")?;
            Some(TestRef { path: &span[..at + 3], name: &span[at + 5..] })
        })
        .collect()
}

/// Reads a test cell, or says what is wrong with it.
fn decide(cell: &str) -> Result<Decision, String> {
    for (prefix, decision) in [("not yet:", Decision::NotYet), ("n/a:", Decision::NotApplicable)] {
        if let Some(reason) = cell.strip_prefix(prefix) {
            return if reason.trim().is_empty() { Err(format!("`{prefix}` without a reason")) } else { Ok(decision) };
        }
    }
    if cell.is_empty() {
        return Err("the test cell is empty: name a test, or say `not yet: …` or `n/a: …`".to_owned());
    }
    for part in cell.split("<br>").flat_map(|p| p.split(", ")).map(str::trim) {
        let span = part.strip_prefix('`').and_then(|p| p.strip_suffix('`'));
        if !span.is_some_and(|s| !s.contains('`') && s.contains(".rs::")) {
            return Err(format!(
                "`{part}` is not a test reference: write `path/file.rs::test_name`, separated by <br> \
                 or \", \"; put remarks in the enforced-in column; or start with `not yet:` or `n/a:`"
            ));
        }
    }
    Ok(Decision::Tested)
}

/// Whether `name` is an identifier.
fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether the lines above a function (`before` ends where its `fn` line starts or inside it)
/// carry a test attribute. Doc comments and other attributes may come in between.
fn marked_as_test(before: &str) -> bool {
    let above = before.rfind('\n').map_or("", |i| &before[..i]);
    for line in above.lines().rev().map(str::trim).filter(|l| !l.is_empty()).take(12) {
        if TEST_ATTRIBUTES.iter().any(|&a| line.starts_with(a)) {
            return true;
        }
        if line.starts_with("//") || line.starts_with("#[") {
            continue;
        }
        // The end of the previous item, or the start of the enclosing block.
        if line.ends_with(['}', ';', '{']) {
            return false;
        }
    }
    false
}

/// Whether `before` ends inside a `proptest!` block. Only an invocation counts: the macro name
/// followed by its opening brace, on a line that is not a comment.
fn inside_proptest(before: &str) -> bool {
    let invocation = before.rmatch_indices("proptest!").find(|&(at, m)| {
        let line_start = before[..at].rfind('\n').map_or(0, |i| i + 1);
        !before[line_start..at].trim_start().starts_with("//") && before[at + m.len()..].trim_start().starts_with('{')
    });
    let Some((start, _)) = invocation else { return false };
    let mut depth = 0i32;
    let mut opened = false;
    for c in before[start..].chars() {
        match c {
            '{' => {
                depth += 1;
                opened = true;
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
    opened && depth > 0
}

/// Whether `source` defines a test function called `name`.
fn defines_test(source: &str, name: &str) -> bool {
    let needle = format!("fn {name}(");
    source.match_indices(&needle).any(|(at, _)| {
        let before = &source[..at];
        let starts_word = before.chars().next_back().is_none_or(char::is_whitespace);
        starts_word && (marked_as_test(before) || inside_proptest(before))
    })
}

#[test]
fn every_named_test_exists() {
    let text = read_table();
    let root = repo_root();
    let mut sources: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for row in rows(&text) {
        for r in references(row.test_cell()) {
            checked += 1;
            if r.path.starts_with('/') || r.path.split('/').any(|p| p == ".." || p.is_empty()) {
                problems.push(format!("{}: `{}` must be a plain path from the repository root", row.at(), r.path));
                continue;
            }
            if !is_identifier(r.name) {
                problems.push(format!("{}: `{}` is not a function name", row.at(), r.name));
                continue;
            }
            let source = sources.entry(r.path.to_owned()).or_insert_with(|| fs::read_to_string(root.join(r.path)).ok());
            match source.as_deref() {
                None => problems.push(format!("{}: file `{}` does not exist", row.at(), r.path)),
                Some(source) if !defines_test(source, r.name) => {
                    let what = if source.contains(&format!("fn {}(", r.name)) {
                        "has a function of that name, but it is not marked as a test"
                    } else {
                        "has no function of that name"
                    };
                    problems.push(format!("{}: `{}::{}`: the file {what}", row.at(), r.path, r.name));
                }
                Some(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {checked} test references in CONFORMANCE.md are wrong (rename them, or downgrade the row to \
         `not yet: …`):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(checked > 0, "no test references found in {TABLE}: is the table still there?");
    println!("{checked} test references in CONFORMANCE.md, all found in {} files", sources.len());
}

/// The counts one row of the table adds to the summary, in the summary's column order after
/// `statements`: bind the server, mapped to a test, not yet, n/a.
fn contribution(row: &Row, decision: Decision) -> [usize; 5] {
    [
        1,
        usize::from(BINDS_THE_SERVER.contains(&row.binds())),
        usize::from(decision == Decision::Tested),
        usize::from(decision == Decision::NotYet),
        usize::from(decision == Decision::NotApplicable),
    ]
}

/// The summary table as written: its column names, and per chapter (and `total`) its cells.
type Summary = (Vec<String>, BTreeMap<String, Vec<String>>);

/// The summary table: its column names and, per chapter (and `total`), the counts it states.
fn stated_summary(text: &str) -> Option<Summary> {
    let mut lines = text.lines().skip_while(|l| cells(l).and_then(|c| c.first().copied()) != Some("chapter"));
    let header: Vec<String> = cells(lines.next()?)?.into_iter().map(str::to_owned).collect();
    let clean = |c: &str| c.trim_matches('*').trim().to_lowercase();
    let mut stated: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in lines.map_while(cells) {
        if row.iter().all(|c| c.chars().all(|ch| matches!(ch, '-' | ':'))) {
            continue;
        }
        stated.insert(clean(row[0]), row[1..].iter().copied().map(clean).collect());
    }
    Some((header, stated))
}

#[test]
fn every_row_is_decided() {
    let text = read_table();
    let rows = rows(&text);
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut counted: BTreeMap<String, [usize; 5]> = BTreeMap::new();
    for row in &rows {
        if row.cells.len() != 5 {
            problems.push(format!(
                "{}: {} cells, expected 5 (id | binds | requirement | enforced in | test); a `|` inside a cell?",
                row.at(),
                row.cells.len()
            ));
            continue;
        }
        if !seen.insert(row.id.as_str()) {
            problems.push(format!("{}: the id appears more than once", row.at()));
        }
        if !BINDS.contains(&row.binds()) {
            problems.push(format!("{}: binds `{}` is not one of {BINDS:?}", row.at(), row.binds()));
        }
        if row.cells[2].is_empty() || row.cells[3].is_empty() {
            problems.push(format!("{}: the requirement and enforced-in cells must not be empty", row.at()));
        }
        let chapter = row.id.trim_start_matches("MQTT-").split('.').next().unwrap_or_default().to_owned();
        match decide(row.test_cell()) {
            Ok(decision) => {
                for key in [chapter, "total".to_owned()] {
                    let sums = counted.entry(key).or_default();
                    for (sum, n) in sums.iter_mut().zip(contribution(row, decision)) {
                        *sum += n;
                    }
                }
            }
            Err(e) => problems.push(format!("{}: {e}", row.at())),
        }
    }
    if rows.len() < MIN_ROWS {
        problems.push(format!("only {} statement rows; MQTT 5.0 has 251 that bind a client or server", rows.len()));
    }
    match stated_summary(&text) {
        None => problems.push(
            "no summary table (a header row starting `| chapter |`, then one row per chapter and `total`)".to_owned(),
        ),
        Some((header, stated)) => {
            for (key, sums) in &counted {
                let Some(values) = stated.get(key) else {
                    problems.push(format!("summary: no row for `{key}`"));
                    continue;
                };
                for (i, sum) in sums.iter().enumerate() {
                    let column = header.get(i + 1).map_or("?", String::as_str);
                    let value = values.get(i).map_or("", String::as_str);
                    if value != sum.to_string() {
                        problems.push(format!(
                            "summary, row `{key}`, column `{column}`: says {value:?}, the table has {sum}"
                        ));
                    }
                }
            }
            for key in stated.keys().filter(|k| !counted.contains_key(*k)) {
                problems.push(format!("summary: row `{key}` has no statements in the table"));
            }
        }
    }
    assert!(problems.is_empty(), "CONFORMANCE.md has {} problems:\n{}", problems.len(), problems.join("\n"));
    let total = counted.get("total").copied().unwrap_or_default();
    println!(
        "{} statements: {} mapped to tests, {} not yet, {} n/a; {} bind the server",
        total[0], total[2], total[3], total[4], total[1]
    );
}

#[test]
fn rows_follow_the_spec_order() {
    let text = read_table();
    let rows = rows(&text);
    let mut problems = Vec::new();
    let mut previous: Option<(Vec<u32>, &Row)> = None;
    for row in &rows {
        let Some(numbers) = id_numbers(&row.id) else {
            problems.push(format!("{}: the id is not of the form MQTT-<chapter>.<section>.<sub>-<n>", row.at()));
            continue;
        };
        if let Some((before, prev)) = &previous {
            if *before >= numbers {
                problems.push(format!("{}: comes after {}, but should come before it", row.at(), prev.id));
            }
        }
        previous = Some((numbers, row));
    }
    assert!(problems.is_empty(), "CONFORMANCE.md rows are out of order:\n{}", problems.join("\n"));
}
