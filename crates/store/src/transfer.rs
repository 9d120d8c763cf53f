//! Moving an installation from SQLite to PostgreSQL (`meshd coordinator migrate`).
//!
//! Both databases are first brought to the newest schema (the same one: the migrations are
//! twins). Then every table but `schema_migrations` is copied row by row, ids included, from
//! one SQLite read transaction into one PostgreSQL transaction; the identity sequences are
//! moved past the copied ids; and the row count of every table is compared on both sides
//! before the PostgreSQL transaction commits. Anything short of that commits nothing. The
//! target must be empty. Stop the coordinator first: a coordinator writing to the SQLite file
//! meanwhile would not see its later writes copied.

use std::path::{Path, PathBuf};

use postgres::types::ToSql;
use rusqlite::types::ValueRef;

use crate::{PgStore, SqliteStore, StoreError};

/// Why a migration stopped (nothing was written to the target).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The source file does not exist (it is not created).
    #[error("{}: no such SQLite database", .0.display())]
    NoSource(PathBuf),
    /// Opening or reading or writing a database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target already holds data.
    #[error("the target database is not empty: table {table} has {rows} rows (migrate into an empty database)")]
    NotEmpty {
        /// Table.
        table: String,
        /// Its rows.
        rows: i64,
    },
    /// The two schemas differ (a meshd bug: the migrations are kept in step).
    #[error("the schemas differ: {0}")]
    Schema(String),
    /// A value that does not fit its PostgreSQL column.
    #[error("table {table} column {column}: {what}")]
    Value {
        /// Table.
        table: String,
        /// Column.
        column: String,
        /// What is wrong.
        what: &'static str,
    },
    /// The copy does not have the source's row count.
    #[error("table {table}: {source_rows} rows in SQLite but {target_rows} in PostgreSQL after the copy")]
    Count {
        /// Table.
        table: String,
        /// Rows in the source.
        source_rows: i64,
        /// Rows in the target.
        target_rows: i64,
    },
}

impl From<rusqlite::Error> for TransferError {
    fn from(e: rusqlite::Error) -> Self {
        TransferError::Store(e.into())
    }
}

impl From<postgres::Error> for TransferError {
    fn from(e: postgres::Error) -> Self {
        TransferError::Store(e.into())
    }
}

/// Rows copied, per table (in copy order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    /// Table.
    pub table: String,
    /// Rows, the same on both sides.
    pub rows: i64,
}

/// A PostgreSQL column type the schema uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgType {
    BigInt,
    Bool,
    Text,
    Bytes,
}

struct Column {
    name: String,
    ty: PgType,
    identity: bool,
}

/// The tables of the PostgreSQL schema (but `schema_migrations`), with their columns.
fn pg_tables(c: &mut postgres::Client) -> Result<Vec<(String, Vec<Column>)>, TransferError> {
    let mut tables: Vec<(String, Vec<Column>)> = Vec::new();
    for r in c.query(
        "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT, is_identity::TEXT
         FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name <> 'schema_migrations'
         ORDER BY table_name, ordinal_position",
        &[],
    )? {
        let table: String = r.try_get(0)?;
        let name: String = r.try_get(1)?;
        let ty: String = r.try_get(2)?;
        let identity: String = r.try_get(3)?;
        let ty = match ty.as_str() {
            "bigint" => PgType::BigInt,
            "boolean" => PgType::Bool,
            "text" => PgType::Text,
            "bytea" => PgType::Bytes,
            other => {
                return Err(TransferError::Schema(format!(
                    "{table}.{name} has type {other}, which the migration does not copy"
                )))
            }
        };
        let col = Column {
            name,
            ty,
            identity: identity == "YES",
        };
        match tables.last_mut() {
            Some((t, cols)) if *t == table => cols.push(col),
            _ => tables.push((table, vec![col])),
        }
    }
    Ok(tables)
}

/// Double-quoted identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// One SQLite value as a parameter for a PostgreSQL column of type `ty`.
fn convert(
    v: ValueRef<'_>,
    ty: PgType,
    table: &str,
    column: &str,
) -> Result<Box<dyn ToSql + Sync>, TransferError> {
    let bad = |what| TransferError::Value {
        table: table.to_string(),
        column: column.to_string(),
        what,
    };
    Ok(match (ty, v) {
        (PgType::BigInt, ValueRef::Null) => Box::new(None::<i64>),
        (PgType::BigInt, ValueRef::Integer(i)) => Box::new(Some(i)),
        (PgType::Bool, ValueRef::Null) => Box::new(None::<bool>),
        (PgType::Bool, ValueRef::Integer(i)) => Box::new(Some(i != 0)),
        (PgType::Text, ValueRef::Null) => Box::new(None::<String>),
        (PgType::Text, ValueRef::Text(t)) => Box::new(Some(
            std::str::from_utf8(t)
                .map_err(|_| bad("text that is not UTF-8"))?
                .to_string(),
        )),
        (PgType::Bytes, ValueRef::Null) => Box::new(None::<Vec<u8>>),
        (PgType::Bytes, ValueRef::Blob(b)) => Box::new(Some(b.to_vec())),
        (PgType::BigInt | PgType::Bool, _) => return Err(bad("not an integer")),
        (PgType::Text, _) => return Err(bad("not text")),
        (PgType::Bytes, _) => return Err(bad("not a blob")),
    })
}

/// Copies the SQLite database at `source` into the empty PostgreSQL database `target` (see
/// the module docs). Returns the row counts, verified equal on both sides.
pub fn sqlite_to_postgres(source: &Path, target: &str) -> Result<Vec<TableCount>, TransferError> {
    if !source.is_file() {
        return Err(TransferError::NoSource(source.to_owned()));
    }
    let src = SqliteStore::open(source)?;
    let dst = PgStore::open(target)?;
    let (sv, dv) = (src.schema_version()?, dst.schema_version()?);
    if sv != dv {
        return Err(TransferError::Schema(format!(
            "SQLite is at schema version {sv}, PostgreSQL at {dv}"
        )));
    }
    let mut sc = src.lock()?;
    let mut pc = dst.conn()?;
    copy(&mut sc, &mut pc)
}

fn copy(
    sc: &mut rusqlite::Connection,
    pc: &mut postgres::Client,
) -> Result<Vec<TableCount>, TransferError> {
    let tables = pg_tables(pc)?;
    // Refuse a target with data before reading anything.
    for (table, _) in &tables {
        let n: i64 = pc
            .query_one(&format!("SELECT COUNT(*) FROM {}", ident(table)), &[])?
            .try_get(0)?;
        if n != 0 {
            return Err(TransferError::NotEmpty {
                table: table.clone(),
                rows: n,
            });
        }
    }
    let stx = sc.transaction()?;
    // The same tables on both sides.
    let mut sqlite_tables: Vec<String> = {
        let mut st = stx.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite_%' AND name <> 'schema_migrations' ORDER BY name",
        )?;
        let names = st.query_map([], |r| r.get::<_, String>(0))?;
        names.collect::<Result<_, _>>()?
    };
    sqlite_tables.sort();
    let mut pg_names: Vec<String> = tables.iter().map(|t| t.0.clone()).collect();
    pg_names.sort();
    if sqlite_tables != pg_names {
        return Err(TransferError::Schema(format!(
            "SQLite has tables {sqlite_tables:?}, PostgreSQL {pg_names:?}"
        )));
    }
    let mut ptx = pc.transaction()?;
    let mut counts = Vec::new();
    for (table, cols) in &tables {
        let names: Vec<String> = cols.iter().map(|c| ident(&c.name)).collect();
        let list = names.join(", ");
        let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let insert = ptx.prepare(&format!(
            "INSERT INTO {} ({list}) VALUES ({})",
            ident(table),
            placeholders.join(", ")
        ))?;
        let mut st = stx
            .prepare(&format!("SELECT {list} FROM {}", ident(table)))
            .map_err(|e| TransferError::Schema(format!("reading {table} from SQLite: {e}")))?;
        let mut rows = st.query([])?;
        let mut copied: i64 = 0;
        while let Some(r) = rows.next()? {
            let mut params: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(cols.len());
            for (i, c) in cols.iter().enumerate() {
                params.push(convert(r.get_ref(i)?, c.ty, table, &c.name)?);
            }
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
            ptx.execute(&insert, &refs)?;
            copied += 1;
        }
        for c in cols.iter().filter(|c| c.identity) {
            // The next id the store assigns follows the highest copied one.
            ptx.query(
                &format!(
                    "SELECT setval(pg_get_serial_sequence($1, $2),
                                   COALESCE((SELECT MAX({col}) FROM {t}), 0) + 1, false)",
                    col = ident(&c.name),
                    t = ident(table)
                ),
                &[table, &c.name],
            )?;
        }
        let source_rows: i64 =
            stx.query_row(&format!("SELECT COUNT(*) FROM {}", ident(table)), [], |r| {
                r.get(0)
            })?;
        let target_rows: i64 = ptx
            .query_one(&format!("SELECT COUNT(*) FROM {}", ident(table)), &[])?
            .try_get(0)?;
        if source_rows != target_rows || copied != source_rows {
            return Err(TransferError::Count {
                table: table.clone(),
                source_rows,
                target_rows,
            });
        }
        counts.push(TableCount {
            table: table.clone(),
            rows: target_rows,
        });
    }
    ptx.commit()?;
    stx.commit()?;
    Ok(counts)
}
