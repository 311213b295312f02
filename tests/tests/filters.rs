//! End-to-end filters inside the network: excluded columns and rows, and masked values,
//! never reach relay-inner's spool, the tunnel, relay-outer's store or the target; the
//! target holds exactly the rows and columns the filter lets through, through the initial
//! copy and the stream (rows moving into and out of a row filter included).

use std::path::Path;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::{require_root, try_wait_until};

/// The secret of `hash` masks.
const KEY: &str = "0123456789abcdef-mask-key";

const SETUP: &str = "\
CREATE EXTENSION pgcrypto;\
CREATE TABLE public.customers (id int PRIMARY KEY, region text, email text, ssn text, name text, city text, notes text);\
ALTER TABLE public.customers REPLICA IDENTITY FULL;\
INSERT INTO public.customers SELECT g, CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, \
  'MARKER-EMAIL-' || (g % 7) || '@example.com', 'MARKER-SSN-' || g, 'MARKER-NAME-' || g, \
  CASE WHEN g % 3 = 0 THEN 'MARKER-US-CITY' ELSE 'Paris' END, 'MARKER-NOTES-' || g \
  FROM generate_series(1, 300) g;\
CREATE TABLE public.orders (id int PRIMARY KEY, amount int, secret text);\
INSERT INTO public.orders SELECT g, g * 10, 'MARKER-SECRET-' || g FROM generate_series(1, 200) g;";

/// Everything the filters must keep inside.
const MARKERS: &[&str] = &[
    "MARKER-EMAIL",
    "MARKER-SSN",
    "MARKER-NAME",
    "MARKER-US-CITY",
    "MARKER-NOTES",
    "MARKER-SECRET",
];

/// Files under `dir` holding `needle`, with the first such file's offset.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                    out.push(format!("{} at {at}", p.display()));
                }
            }
        }
    }
    out
}

/// What the target must hold of `customers`: the EU rows, emails hashed, ssn NULL, name
/// replaced, no notes column.
const WANT_CUSTOMERS: &str = "SELECT coalesce(string_agg(concat_ws(',', id, region, \
    encode(hmac(email, '0123456789abcdef-mask-key', 'sha256'), 'hex'), 'NULL', \
    CASE WHEN name IS NULL THEN 'NULL' ELSE 'REDACTED' END, city), E'\\n' ORDER BY id), '') \
    FROM public.customers WHERE region = 'eu'";
const GOT_CUSTOMERS: &str = "SELECT coalesce(string_agg(concat_ws(',', id, region, email, \
    coalesce(ssn, 'NULL'), coalesce(name, 'NULL'), city), E'\\n' ORDER BY id), '') FROM public.customers";

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn excluded_and_masked_data_never_leaves_the_source() {
    require_root();
    let dir = routy_e2e::tempdir();
    let key = dir.path().join("mask.key");
    std::fs::write(&key, KEY).unwrap();
    let rig = CdcRig::start(RigOpts {
        setup_sql: SETUP.into(),
        tables: vec![
            "{ name: public.customers, exclude_columns: [notes], where: \"region = 'eu'\", \
             mask: { email: hash, ssn: null, name: \"REDACTED\" } }"
                .into(),
            "{ name: public.orders, columns: [id, amount], where: \"id % 2 = 0\" }".into(),
        ],
        pg_extra: format!("        mask_key_file: {}\n", key.display()),
        ..RigOpts::default()
    });
    // The publication holds what PostgreSQL can filter: the orders' column list and both
    // row filters (customers is REPLICA IDENTITY FULL: its notes are dropped by
    // relay-inner).
    let published = rig.source.psql(
        "SELECT string_agg(tablename || ':' || array_to_string(attnames, ',') || ':' || coalesce(rowfilter, '-'), ' ' ORDER BY tablename) \
         FROM pg_publication_tables WHERE pubname = 'routy_main'",
    );
    assert!(
        published.contains("orders:id,amount:((id % 2) = 0)")
            && published
                .contains("customers:id,region,email,ssn,name,city,notes:(region = 'eu'::text)"),
        "{published}"
    );
    // Streamed changes: new rows on both sides of the filter, rows moving in and out,
    // updates of excluded and masked columns.
    rig.source.psql(
        "INSERT INTO public.customers SELECT g, CASE WHEN g % 2 = 0 THEN 'us' ELSE 'eu' END, \
           'MARKER-EMAIL-' || (g % 7) || '@example.com', 'MARKER-SSN-' || g, 'MARKER-NAME-' || g, \
           CASE WHEN g % 2 = 0 THEN 'MARKER-US-CITY' ELSE 'Lyon' END, 'MARKER-NOTES-' || g \
           FROM generate_series(301, 400) g; \
         UPDATE public.customers SET region = 'eu', city = 'Berlin' WHERE id IN (3, 6, 9); \
         UPDATE public.customers SET region = 'us' WHERE id IN (1, 2); \
         UPDATE public.customers SET notes = 'MARKER-NOTES-changed', ssn = 'MARKER-SSN-changed' WHERE id % 10 = 1; \
         UPDATE public.customers SET email = 'MARKER-EMAIL-new@example.com' WHERE id = 4; \
         DELETE FROM public.customers WHERE id IN (5, 12); \
         INSERT INTO public.orders SELECT g, g, 'MARKER-SECRET-' || g FROM generate_series(201, 260) g; \
         UPDATE public.orders SET amount = amount + 1, secret = 'MARKER-SECRET-x' WHERE id <= 20;",
    );
    let want = rig.source.psql(WANT_CUSTOMERS);
    let want_orders = rig.source.psql(
        "SELECT string_agg(id || ',' || amount, E'\\n' ORDER BY id) FROM public.orders WHERE id % 2 = 0",
    );
    let got_orders =
        "SELECT string_agg(id || ',' || amount, E'\\n' ORDER BY id) FROM public.orders";
    let res = try_wait_until(CATCH_UP, "the target holds the filtered rows", || {
        rig.target.try_psql(GOT_CUSTOMERS).is_ok_and(|g| g == want)
            && rig
                .target
                .try_psql(got_orders)
                .is_ok_and(|g| g == want_orders)
    });
    if let Err(e) = res {
        panic!(
            "{e}\ncustomers: got\n{}\nwant\n{want}\norders got {:?}",
            rig.target
                .try_psql(GOT_CUSTOMERS)
                .unwrap_or_default()
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
            rig.target.try_psql(got_orders).map(|s| s.len())
        );
    }
    // Equal emails hash alike (joinable), and the target never got a column it should not.
    let distinct = rig
        .target
        .psql("SELECT count(DISTINCT email) FROM public.customers");
    assert_eq!(distinct, "8", "7 emails and the new one, hashed");
    let cols = rig.target.psql(
        "SELECT string_agg(table_name || '.' || column_name, ',' ORDER BY table_name, ordinal_position) \
         FROM information_schema.columns WHERE table_schema = 'public'",
    );
    assert_eq!(
        cols,
        "customers.id,customers.region,customers.email,customers.ssn,customers.name,customers.city,orders.id,orders.amount"
    );
    // Nothing excluded or unmasked is in the spool, the store or the target's files; the
    // search finds what was let through.
    assert!(
        !files_holding(&rig.store_dir, b"Paris").is_empty(),
        "the search finds data that was let through"
    );
    for m in MARKERS {
        for dir in [&rig.spool_dir, &rig.store_dir] {
            let found = files_holding(dir, m.as_bytes());
            assert!(found.is_empty(), "{m} reached {}: {found:?}", dir.display());
        }
    }
    for m in MARKERS {
        let n = rig.target.psql(&format!(
            "SELECT count(*) FROM public.customers c WHERE c::text LIKE '%{m}%'"
        ));
        assert_eq!(n, "0", "{m} in the target");
    }
}
