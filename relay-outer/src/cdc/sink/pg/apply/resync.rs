//! A resync's chunk end on the target: rows of the chunk's key range that the source no
//! longer has are deleted, so the table ends as the source's without ever being emptied.

use relay_proto::cdc::Value;

use super::Conn;
use crate::cdc::sink::Flow;

/// Whether a target type compares differently by collation: such keys are compared in
/// byte order (`COLLATE "C"`), as relay-inner ordered the chunks.
fn collatable(ty: &str) -> bool {
    ty == "text" || ty.starts_with("character varying") || ty.starts_with("character(")
}

impl Conn {
    /// Deletes the target rows of `rel` whose key is in `(lo, hi]` and not among `keys`.
    pub(crate) async fn chunk(
        &mut self,
        rel: u32,
        lo: Option<Vec<Value>>,
        hi: Option<Vec<Value>>,
        keys: Vec<Vec<Value>>,
    ) -> Result<(), Flow> {
        self.flush().await?;
        self.ensure_table(rel).await?;
        self.ensure_key(rel).await?;
        let t = &self.tables[&rel];
        if !t.keyed || t.key_idx.is_empty() {
            return Ok(());
        }
        let key_cols: Vec<(String, String)> = t
            .key_idx
            .iter()
            .map(|&i| (t.cols[i].name.clone(), t.cols[i].ty.clone()))
            .collect();
        let ident = t.ident.clone();
        let tdisp = t.display.clone();
        let n = key_cols.len();
        let side = |col: &str, ty: &str| {
            if collatable(ty) {
                format!("{col} COLLATE \"C\"")
            } else {
                col.to_string()
            }
        };
        let lhs: Vec<String> = key_cols.iter().map(|(c, ty)| side(c, ty)).collect();
        let lhs = format!("({})", lhs.join(", "));
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        let mut conds = Vec::new();
        let text = |v: &Value| match v {
            Value::Text(t) => Some(t.clone()),
            _ => None,
        };
        for (bound, op) in [(&lo, ">"), (&hi, "<=")] {
            let Some(b) = bound else { continue };
            let mut ph = Vec::new();
            for (j, (_, ty)) in key_cols.iter().enumerate() {
                params.push(Box::new(b.get(j).and_then(text)));
                let p = format!("${}::text::{ty}", params.len());
                ph.push(if collatable(ty) {
                    format!("{p} COLLATE \"C\"")
                } else {
                    p
                });
            }
            conds.push(format!("{lhs} {op} ({})", ph.join(", ")));
        }
        let mut arrays = Vec::new();
        for j in 0..n {
            let col: Vec<Option<String>> = keys.iter().map(|k| k.get(j).and_then(text)).collect();
            params.push(Box::new(col));
            arrays.push(format!("${}::text[]", params.len()));
        }
        let names: Vec<String> = (1..=n).map(|i| format!("k{i}")).collect();
        let casts: Vec<String> = key_cols
            .iter()
            .zip(&names)
            .map(|((_, ty), k)| format!("{k}::{ty}"))
            .collect();
        let plain: Vec<&str> = key_cols.iter().map(|(c, _)| c.as_str()).collect();
        conds.push(format!(
            "({}) NOT IN (SELECT {} FROM unnest({}) AS u({}))",
            plain.join(", "),
            casts.join(", "),
            arrays.join(", "),
            names.join(", ")
        ));
        let sql = format!("DELETE FROM {ident} WHERE {}", conds.join(" AND "));
        self.drain().await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let gone = self
            .client
            .execute(sql.as_str(), &refs)
            .await
            .map_err(|e| self.pg_err("deleting rows the source no longer has (resync)", &e))?;
        if gone > 0 {
            tracing::info!(sink = %self.cfg.name, seq = self.seq, table = %tdisp, rows = gone,
                "resync: deleted rows the source no longer has");
        }
        Ok(())
    }
}
