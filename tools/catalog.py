"""Dump a normalized description of one PostgreSQL schema, for comparing databases.

Used by the schema-parity test (kongtask's migrations against graphile-worker's)
and by people checking a database by hand::

    python tools/catalog.py postgresql://localhost/mydb graphile_worker

The description covers everything a client can observe about the schema except
function bodies: tables and their columns, constraints (a column's plain NOT
NULL only as its ``not_null`` flag, on every PostgreSQL version), indexes, sequences,
views, composite types, functions (signature, result, language, volatility,
...), row level security, policies, triggers, comments, and the rows of the
``migrations`` table (id and breaking, not the timestamp). kongtask's own
objects (named ``_kongtask*``) are left out: they are outside the contract. Definitions are
rendered with the schema on the ``search_path``, so they do not mention the
schema name and two schemas of different names compare equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["diff_catalogs", "dump_catalog", "main"]

_RELATIONS = """
select c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
       c.relpersistence, c.reloptions, c.relacl::text[], c.relreplident,
       obj_description(c.oid, 'pg_class')
  from pg_catalog.pg_class as c
 where c.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
 order by c.relname
"""

_COLUMNS = """
select c.relname,
       a.attname,
       format_type(a.atttypid, a.atttypmod),
       a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid),
       a.attidentity,
       a.attgenerated,
       coll.collname,
       a.attacl::text[],
       col_description(c.oid, a.attnum)
  from pg_catalog.pg_attribute as a
  join pg_catalog.pg_class as c on c.oid = a.attrelid
  left join pg_catalog.pg_attrdef as d on d.adrelid = a.attrelid and d.adnum = a.attnum
  left join pg_catalog.pg_collation as coll
    on coll.oid = a.attcollation and a.attcollation <> 0
 where c.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
   and c.relkind in ('r', 'p', 'v', 'm', 'c', 'f')
   and a.attnum > 0 and not a.attisdropped
 order by c.relname, a.attnum
"""

# PostgreSQL 18 records every NOT NULL as a constraint row (contype 'n', named
# ``<table>_<column>_not_null``); earlier versions only set the column's
# attnotnull, which the columns already report as ``not_null``. A plain one
# (validated, inheritable, ``NOT NULL <column>``) says nothing more than that
# flag, so it is left out and one schema compares equal on every version; a
# NOT VALID or NO INHERIT one (PostgreSQL 18 only) says more and is kept.
_CONSTRAINTS = """
select c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid),
       con.condeferrable, con.condeferred, con.convalidated
  from pg_catalog.pg_constraint as con
  join pg_catalog.pg_class as c on c.oid = con.conrelid
 where c.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
   and not (
     con.contype = 'n' and con.convalidated and not con.connoinherit
     and pg_get_constraintdef(con.oid) = 'NOT NULL ' || (
       select quote_ident(a.attname)
         from pg_catalog.pg_attribute as a
        where a.attrelid = con.conrelid and a.attnum = con.conkey[1] and a.attnotnull
     )
   )
 order by c.relname, con.conname
"""

_INDEXES = """
select t.relname, i.relname, pg_get_indexdef(x.indexrelid), x.indisunique, x.indisprimary
  from pg_catalog.pg_index as x
  join pg_catalog.pg_class as i on i.oid = x.indexrelid
  join pg_catalog.pg_class as t on t.oid = x.indrelid
 where t.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
 order by i.relname
"""

_SEQUENCES = """
select c.relname, format_type(s.seqtypid, null), s.seqstart, s.seqincrement,
       s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
       owner_table.relname, owner_column.attname, dep.deptype
  from pg_catalog.pg_sequence as s
  join pg_catalog.pg_class as c on c.oid = s.seqrelid
  left join pg_catalog.pg_depend as dep
    on dep.classid = 'pg_class'::regclass and dep.objid = c.oid
   and dep.refclassid = 'pg_class'::regclass and dep.deptype in ('a', 'i')
  left join pg_catalog.pg_class as owner_table on owner_table.oid = dep.refobjid
  left join pg_catalog.pg_attribute as owner_column
    on owner_column.attrelid = dep.refobjid and owner_column.attnum = dep.refobjsubid
 where c.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
 order by c.relname
"""

_TYPES = """
select t.typname, t.typtype, c.relkind, obj_description(t.oid, 'pg_type')
  from pg_catalog.pg_type as t
  left join pg_catalog.pg_class as c on c.oid = t.typrelid
 where t.typnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
   and t.typcategory <> 'A'
 order by t.typname
"""

_FUNCTIONS = """
select p.proname,
       pg_get_function_identity_arguments(p.oid),
       pg_get_function_arguments(p.oid),
       pg_get_function_result(p.oid),
       l.lanname,
       p.prokind,
       p.provolatile,
       p.proisstrict,
       p.prosecdef,
       p.proleakproof,
       p.proparallel,
       p.procost,
       p.prorows,
       p.proretset,
       p.proconfig,
       p.proacl::text[],
       obj_description(p.oid, 'pg_proc')
  from pg_catalog.pg_proc as p
  join pg_catalog.pg_language as l on l.oid = p.prolang
 where p.pronamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
 order by p.proname, pg_get_function_identity_arguments(p.oid)
"""

_TRIGGERS = """
select c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled
  from pg_catalog.pg_trigger as t
  join pg_catalog.pg_class as c on c.oid = t.tgrelid
 where c.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
 order by c.relname, t.tgname
"""

_POLICIES = """
select c.relname, p.polname, p.polcmd, p.polpermissive,
       pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
  from pg_catalog.pg_policy as p
  join pg_catalog.pg_class as c on c.oid = p.polrelid
 where c.relnamespace = (select oid from pg_catalog.pg_namespace where nspname = %(nsp)s)
 order by c.relname, p.polname
"""

_SCHEMA = """
select n.nspacl::text[], obj_description(n.oid, 'pg_namespace')
  from pg_catalog.pg_namespace as n
 where n.nspname = %(schema)s
"""

_RELKINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "c": "composite type",
    "S": "sequence",
    "i": "index",
    "I": "partitioned index",
    "f": "foreign table",
    "t": "toast table",
}


KONGTASK_PREFIX = "_kongtask"
"""kongtask's own objects (outside graphile-worker's contract) are named with this prefix."""


def _rows(cur: psycopg.Cursor[Any], query: str, schema: str) -> list[tuple[Any, ...]]:
    """Run a catalog query with the schema bound; drop rows about kongtask's own objects.

    Every query names the owning object (relation, type or function) first, and
    kongtask's additions all start with ``_kongtask``: they are not part of the
    schema shared with graphile-worker, so a comparison must not see them.
    """
    cur.execute(query, {"nsp": schema, "schema": schema})
    return [
        row
        for row in cur.fetchall()
        if not (isinstance(row[0], str) and row[0].startswith(KONGTASK_PREFIX))
    ]


def dump_catalog(conn_or_url: psycopg.Connection[Any] | str, schema: str) -> dict[str, Any]:
    """Describe ``schema`` as a JSON-able dict; equal dicts mean equivalent schemas.

    Accepts an open connection (left open; the session's ``search_path`` is
    restored) or a connection string. Raises ``LookupError`` if the schema does
    not exist.
    """
    if isinstance(conn_or_url, str):
        with psycopg.connect(conn_or_url, autocommit=True) as conn:
            return _dump(conn, schema)
    return _dump(conn_or_url, schema)


def _dump(conn: psycopg.Connection[Any], schema: str) -> dict[str, Any]:
    with conn.transaction(), conn.cursor() as cur:
        # Local to this transaction: definitions then name objects of the schema
        # without qualification, and everything else with it.
        cur.execute(
            "select set_config('search_path', %s, true)",
            (sql.Identifier(schema).as_string(conn) + ", pg_catalog",),
        )
        schema_row = _rows(cur, _SCHEMA, schema)
        if not schema_row:
            raise LookupError(f"schema {schema!r} does not exist")
        nspacl, schema_comment = schema_row[0]
        catalog: dict[str, Any] = {
            "schema": {"acl": nspacl, "comment": schema_comment},
            "relations": {},
            "functions": {},
            "types": {},
            "triggers": [],
            "migrations": None,
        }
        relations: dict[str, Any] = catalog["relations"]
        for name, kind, rls, force_rls, persistence, options, acl, replident, comment in _rows(
            cur, _RELATIONS, schema
        ):
            relations[name] = {
                "kind": _RELKINDS.get(kind, kind),
                "row_security": rls,
                "force_row_security": force_rls,
                "persistence": persistence,
                "options": options,
                "acl": acl,
                "replica_identity": replident,
                "comment": comment,
            }
        for rel, column, type_, notnull, default, identity, generated, coll, acl, comment in _rows(
            cur, _COLUMNS, schema
        ):
            entry = {
                "name": column,
                "type": type_,
                "not_null": notnull,
                "identity": identity or None,
                "acl": acl,
                "comment": comment,
                "collation": coll,
            }
            # A generated column's expression lives where a default would.
            if generated:
                entry["generated"] = {"kind": generated, "expression": default}
            else:
                entry["default"] = default
            relations[rel].setdefault("columns", []).append(entry)
        for rel, name, kind, definition, deferrable, deferred, validated in _rows(
            cur, _CONSTRAINTS, schema
        ):
            relations[rel].setdefault("constraints", {})[name] = {
                "type": kind,
                "definition": definition,
                "deferrable": deferrable,
                "deferred": deferred,
                "validated": validated,
            }
        for table, name, definition, unique, primary in _rows(cur, _INDEXES, schema):
            if name.startswith(KONGTASK_PREFIX):
                continue  # kongtask's own index on a shared table
            relations[name]["index"] = {
                "table": table,
                "definition": definition,
                "unique": unique,
                "primary": primary,
            }
        for row in _rows(cur, _SEQUENCES, schema):
            name, type_, start, inc, lo, hi, cache, cycle, table, column, deptype = row
            relations[name]["sequence"] = {
                "type": type_,
                "start": start,
                "increment": inc,
                "min": lo,
                "max": hi,
                "cache": cache,
                "cycle": cycle,
                "owned_by": f"{table}.{column}" if table else None,
                "dependency": deptype,
            }
        for rel, name, cmd, permissive, qual, check in _rows(cur, _POLICIES, schema):
            relations[rel].setdefault("policies", {})[name] = {
                "command": cmd,
                "permissive": permissive,
                "using": qual,
                "with_check": check,
            }
        for name, typtype, relkind, comment in _rows(cur, _TYPES, schema):
            catalog["types"][name] = {
                "kind": typtype,
                "relation_kind": _RELKINDS.get(relkind, relkind),
                "comment": comment,
            }
        for row in _rows(cur, _FUNCTIONS, schema):
            name, identity_args, args, result, lang, kind, volatility, strict = row[:8]
            secdef, leakproof, parallel, cost, rows, retset, config, acl, comment = row[8:]
            catalog["functions"][f"{name}({identity_args})"] = {
                "arguments": args,
                "result": result,
                "language": lang,
                "kind": kind,
                "volatility": volatility,
                "strict": strict,
                "security_definer": secdef,
                "leakproof": leakproof,
                "parallel": parallel,
                "cost": float(cost),
                "rows": float(rows),
                "returns_set": retset,
                "config": config,
                "acl": acl,
                "comment": comment,
            }
        catalog["triggers"] = [
            {"table": rel, "name": name, "definition": definition, "enabled": enabled}
            for rel, name, definition, enabled in _rows(cur, _TRIGGERS, schema)
        ]
        columns = {c["name"] for c in relations.get("migrations", {}).get("columns", [])}
        if relations.get("migrations", {}).get("kind") == "table" and "id" in columns:
            breaking = sql.SQL("breaking") if "breaking" in columns else sql.SQL("null")
            cur.execute(
                sql.SQL("select id, {} from {}.migrations order by id").format(
                    breaking, sql.Identifier(schema)
                )
            )
            catalog["migrations"] = [{"id": mid, "breaking": brk} for mid, brk in cur.fetchall()]
    return catalog


def _walk(path: str, left: Any, right: Any) -> Iterator[str]:
    """Yield one readable line per difference between two catalog fragments."""
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(set(left) | set(right), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in right:
                yield f"- {where}: only in left: {json.dumps(left[key], default=str)}"
            elif key not in left:
                yield f"+ {where}: only in right: {json.dumps(right[key], default=str)}"
            else:
                yield from _walk(where, left[key], right[key])
    elif isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            yield from _walk(f"{path}[{index}]", a, b)
    elif left != right:
        yield (f"~ {path}: {json.dumps(left, default=str)} != {json.dumps(right, default=str)}")


def diff_catalogs(left: dict[str, Any], right: dict[str, Any]) -> list[str]:
    """Differences between two :func:`dump_catalog` results, one line each (empty if equal)."""
    return list(_walk("", left, right))


def main(argv: list[str] | None = None) -> int:
    """Command line: print the catalog as JSON, or the differences between two schemas."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="connection string of the database")
    parser.add_argument("schema", nargs="?", default="graphile_worker", help="schema to describe")
    parser.add_argument(
        "--against",
        metavar="URL[#SCHEMA]",
        help="compare with this database (optionally another schema) and print the differences",
    )
    args = parser.parse_args(argv)
    left = dump_catalog(args.url, args.schema)
    if args.against is None:
        json.dump(left, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
        return 0
    url, _, other_schema = args.against.partition("#")
    differences = diff_catalogs(left, dump_catalog(url, other_schema or args.schema))
    for line in differences:
        print(line)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
