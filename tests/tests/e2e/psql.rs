//! psql through shardgate: statements, multi-statement strings, COPY both ways
//! (`\copy` files and COPY FROM STDIN / TO STDOUT), errors.

use shardgate_e2e::{psql, unique_name, Proxy, ScratchDir};

/// One CSV field in the form Postgres writes it (so a round trip is byte-exact):
/// NULL is empty, an empty string is `""`, and fields with a delimiter, quote or line
/// break are quoted with quotes doubled.
fn csv_field(v: Option<&str>) -> String {
    match v {
        None => String::new(),
        Some("") => "\"\"".into(),
        Some(s) if s.contains([',', '"', '\n', '\r']) => format!("\"{}\"", s.replace('"', "\"\"")),
        Some(s) => s.into(),
    }
}

fn name_for(i: u32) -> String {
    match i % 7 {
        0 => format!("comma, {i}"),
        1 => format!("quote \"{i}\""),
        2 => format!("line\nbreak {i}"),
        3 => format!("ünïcødé ✓ {i}"),
        4 => String::new(),
        5 => format!("  spaces {i}  "),
        _ => format!("back\\slash {i}"),
    }
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_statements_and_copy_both_ways() {
    let proxy = Proxy::start_default().await;
    let url = proxy.url();
    let t = unique_name("e2e_psql");
    let scratch = ScratchDir::new("psql");

    // Plain statements, a multi-statement string (one simple Query), a result.
    let create = format!("CREATE TABLE {t} (id int PRIMARY KEY, name text, note text)");
    let insert = format!("INSERT INTO {t} SELECT g, 'n' || g, NULL FROM generate_series(1, 10) g");
    let multi = format!("BEGIN; UPDATE {t} SET note = 'x' WHERE id <= 3; COMMIT");
    let select = format!("SELECT count(*), sum(id), count(note) FROM {t}");
    let out = psql(
        &url,
        &[
            "-At", "-c", &create, "-c", &insert, "-c", &multi, "-c", &select,
        ],
        None,
    )
    .await;
    out.assert_success("psql statements");
    assert_eq!(
        lines(&out.stdout),
        [
            "CREATE TABLE",
            "INSERT 0 10",
            "BEGIN",
            "UPDATE 3",
            "COMMIT",
            "10|55|3"
        ],
        "stderr: {}",
        out.stderr
    );

    // \copy FROM a CSV file with awkward values, then \copy TO a file: byte-identical.
    let mut csv = String::new();
    for i in 11..=1010u32 {
        let name = name_for(i);
        let note = (i % 3 != 0).then(|| format!("note{i}"));
        csv.push_str(&format!(
            "{},{},{}\n",
            i,
            csv_field(Some(&name)),
            csv_field(note.as_deref())
        ));
    }
    let input = scratch.path().join("in.csv");
    let output = scratch.path().join("out.csv");
    std::fs::write(&input, &csv).unwrap();
    let copy_in = format!("\\copy {t} FROM '{}' WITH (FORMAT csv)", input.display());
    let copy_out = format!(
        "\\copy (SELECT * FROM {t} WHERE id > 10 ORDER BY id) TO '{}' WITH (FORMAT csv)",
        output.display()
    );
    let out = psql(&url, &["-At", "-c", &copy_in, "-c", &copy_out], None).await;
    out.assert_success("psql \\copy");
    assert_eq!(
        lines(&out.stdout),
        ["COPY 1000", "COPY 1000"],
        "stderr: {}",
        out.stderr
    );
    let back = std::fs::read_to_string(&output).unwrap();
    assert!(
        back == csv,
        "\\copy round trip differs:\nsent:\n{csv}\ngot back:\n{back}"
    );

    // NULL vs empty string survived as such.
    let check = format!(
        "SELECT count(*) FILTER (WHERE name = ''), count(*) FILTER (WHERE note IS NULL), \
         count(*) FILTER (WHERE name LIKE E'line\\nbreak %') FROM {t} WHERE id > 10"
    );
    let out = psql(&url, &["-At", "-c", &check], None).await;
    out.assert_success("psql check");
    let (empties, nulls, breaks) = (
        (11..=1010u32).filter(|i| i % 7 == 4).count(),
        (11..=1010u32).filter(|i| i % 3 == 0).count(),
        (11..=1010u32).filter(|i| i % 7 == 2).count(),
    );
    assert_eq!(out.stdout.trim(), format!("{empties}|{nulls}|{breaks}"));

    // COPY FROM STDIN (text format, psql's stdin) and COPY TO STDOUT.
    let mut text = String::new();
    for i in 1011..=1020u32 {
        text.push_str(&format!("{i}\tstdin {i}\t\\N\n"));
    }
    let out = psql(
        &url,
        &["-At", "-c", &format!("COPY {t} FROM STDIN")],
        Some(text.as_bytes()),
    )
    .await;
    out.assert_success("psql COPY FROM STDIN");
    assert_eq!(out.stdout.trim(), "COPY 10", "stderr: {}", out.stderr);
    let out = psql(
        &url,
        &[
            "-At",
            "-c",
            &format!("COPY (SELECT * FROM {t} WHERE id > 1010 ORDER BY id) TO STDOUT"),
        ],
        None,
    )
    .await;
    out.assert_success("psql COPY TO STDOUT");
    assert_eq!(out.stdout, text);

    // An error is reported as such and the next session works.
    let out = psql(&url, &["-At", "-c", "SELECT 1/0"], None).await;
    assert!(!out.success, "SELECT 1/0 succeeded: {}", out.stdout);
    assert!(
        out.stderr.contains("division by zero"),
        "stderr: {}",
        out.stderr
    );
    let out = psql(&url, &["-At", "-c", &select], None).await;
    out.assert_success("psql after error");
    let sum: u32 = (1..=1020).sum();
    let notes = 3 + (11..=1010u32).filter(|i| i % 3 != 0).count();
    assert_eq!(out.stdout.trim(), format!("1020|{sum}|{notes}"));

    let out = psql(&url, &["-At", "-c", &format!("DROP TABLE {t}")], None).await;
    out.assert_success("psql drop");
}
