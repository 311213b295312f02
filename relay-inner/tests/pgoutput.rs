//! The pgoutput decoder (`relay_proto::pgoutput`) against the bytes a real PostgreSQL
//! writes.

use relay_proto::pgoutput::*;

fn text(s: &str) -> Value {
    Value::Text(s.as_bytes().to_vec())
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s
        .strip_prefix("\\x")
        .unwrap_or_else(|| panic!("not bytea hex: {s:?}"));
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Real PostgreSQL: the bytes pgoutput writes for common types, NULLs, an unchanged
/// TOAST value, TRUNCATE and a logical message decode to what was done.
#[test]
fn decodes_real_pgoutput_stream() {
    let pg = routy_e2e::Pg::start(routy_e2e::PgOpts::default());
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, name text, data bytea, doc jsonb, \
           amount numeric(10,3), flag bool, at timestamptz, big text);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE PUBLICATION pub FOR TABLE t;",
    );
    pg.psql("SELECT pg_create_logical_replication_slot('s', 'pgoutput');");
    let big = "x".repeat(100_000);
    pg.psql(&format!(
        "SET TimeZone = 'UTC';
         INSERT INTO t VALUES (1, 'Grüße, 世界 🌍', '\\x00ff10', '{{\"a\": [1, 2]}}', \
           12345.678, true, '2024-01-02 03:04:05+00', '{big}');
         INSERT INTO t VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         UPDATE t SET name = 'changed' WHERE id = 1;
         DELETE FROM t WHERE id = 2;
         TRUNCATE t;
         SELECT pg_logical_emit_message(true, 'routy', 'hello');"
    ));
    let out = pg.psql(
        "SET TimeZone = 'UTC';
         SELECT lsn || ' ' || xid || ' ' || data FROM pg_logical_slot_get_binary_changes('s', \
           NULL, NULL, 'proto_version', '1', 'publication_names', 'pub', 'messages', 'true');",
    );
    let mut msgs = Vec::new();
    let mut last_lsn = Lsn(0);
    for line in out.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(3, ' ');
        let (lsn, xid, data) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let lsn: Lsn = lsn.parse().unwrap();
        assert!(lsn >= last_lsn, "{lsn} after {last_lsn}");
        last_lsn = lsn;
        let msg = decode(&unhex(data)).unwrap_or_else(|e| panic!("{line:.200}: {e}"));
        if let Message::Begin(b) = &msg {
            assert_eq!(b.xid.to_string(), xid);
        }
        msgs.push(msg);
    }

    // The schema arrives before the first change.
    let rel = msgs
        .iter()
        .find_map(|m| match m {
            Message::Relation(r) => Some(r.clone()),
            _ => None,
        })
        .expect("a Relation message");
    assert_eq!((rel.namespace.as_str(), rel.name.as_str()), ("public", "t"));
    assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<_> = rel
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.is_key()))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", 23, true),
            ("name", 25, false),
            ("data", 17, false),
            ("doc", 3802, false),
            ("amount", 1700, false),
            ("flag", 16, false),
            ("at", 1184, false),
            ("big", 25, false),
        ]
    );
    assert_eq!(rel.columns[4].type_modifier, (10 << 16 | 3) + 4);
    let first_rel = msgs
        .iter()
        .position(|m| matches!(m, Message::Relation(_)))
        .unwrap();
    let first_insert = msgs
        .iter()
        .position(|m| matches!(m, Message::Insert(_)))
        .unwrap();
    assert!(first_rel < first_insert);

    let rest: Vec<_> = msgs
        .into_iter()
        .filter(|m| !matches!(m, Message::Relation(_) | Message::Type(_)))
        .collect();
    let kinds: String = rest
        .iter()
        .map(|m| match m {
            Message::Begin(_) => 'B',
            Message::Commit(_) => 'C',
            Message::Insert(_) => 'I',
            Message::Update(_) => 'U',
            Message::Delete(_) => 'D',
            Message::Truncate(_) => 'T',
            Message::Message(_) => 'M',
            _ => '?',
        })
        .collect();
    assert_eq!(kinds, "BICBICBUCBDCBTCBMC");

    let mut begin = None;
    for m in &rest {
        match m {
            Message::Begin(b) => begin = Some(b.clone()),
            Message::Commit(c) => {
                let b = begin.take().unwrap();
                assert_eq!(c.commit_lsn, b.final_lsn);
                assert_eq!(c.commit_time, b.commit_time);
                assert!(c.end_lsn > c.commit_lsn);
            }
            _ => {}
        }
    }

    let Message::Insert(ins) = &rest[1] else {
        unreachable!()
    };
    assert_eq!(ins.rel_id, rel.rel_id);
    assert_eq!(
        ins.new,
        vec![
            text("1"),
            text("Grüße, 世界 🌍"),
            text("\\x00ff10"),
            text("{\"a\": [1, 2]}"),
            text("12345.678"),
            text("t"),
            text("2024-01-02 03:04:05+00"),
            text(&big),
        ]
    );
    let Message::Insert(ins) = &rest[4] else {
        unreachable!()
    };
    assert_eq!(ins.new[0], text("2"));
    assert!(ins.new[1..].iter().all(|v| *v == Value::Null), "{ins:?}");

    let Message::Update(up) = &rest[7] else {
        unreachable!()
    };
    assert_eq!((&up.key, &up.old), (&None, &None));
    assert_eq!(up.new[0], text("1"));
    assert_eq!(up.new[1], text("changed"));
    assert_eq!(up.new[7], Value::UnchangedToast, "TOAST column must be 'u'");

    let Message::Delete(del) = &rest[10] else {
        unreachable!()
    };
    assert_eq!(del.which, OldKind::Key);
    assert_eq!(del.key_or_old[0], text("2"));

    let Message::Truncate(tr) = &rest[13] else {
        unreachable!()
    };
    assert_eq!(tr.rel_ids, vec![rel.rel_id]);
    assert!(!tr.options.cascade() && !tr.options.restart_identity());

    let Message::Message(lm) = &rest[16] else {
        unreachable!()
    };
    assert!(lm.transactional);
    assert_eq!(lm.prefix, "routy");
    assert_eq!(lm.content, b"hello");
}
