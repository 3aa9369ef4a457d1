-- Sparkplug B aliases (migration 0011): what births defined, kept across restarts.

-- name: load_sparkplug_aliases
SELECT group_id, edge_node_id, device_id, metric_name, alias::text, datatype
FROM sparkplug_aliases

-- name: forget_sparkplug_scope
-- A birth replaces every definition of its scope: aliases of an earlier session are void.
DELETE FROM sparkplug_aliases
WHERE group_id = %(group)s AND edge_node_id = %(node)s AND device_id = %(device)s

-- name: insert_sparkplug_aliases
INSERT INTO sparkplug_aliases
    (group_id, edge_node_id, device_id, metric_name, alias, datatype, serial_id)
SELECT %(group)s, %(node)s, %(device)s, d.name, d.alias, d.datatype, %(serial)s
FROM unnest(%(names)s::text[], %(aliases)s::numeric[], %(datatypes)s::integer[])
    AS d(name, alias, datatype)
