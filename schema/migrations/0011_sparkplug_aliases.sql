-- Sparkplug B births, kept: the metric names, aliases and datatypes each NBIRTH/DBIRTH defined.
--
-- Sparkplug edge nodes publish their births once per session, at QoS 0 and not retained, and
-- their NDATA/DDATA then name metrics by alias only. A restart of iothub between a birth and
-- the data would otherwise leave every alias unknown until the node happens to be reborn. The
-- service writes a birth's rows in the transaction of the batch that holds the birth (so they
-- are durable before anything after it is acknowledged), loads them all at start, and replaces
-- a scope's rows whole on its next birth. Only births of devices in the catalogue are kept, so
-- the table grows with the fleet, not with whatever publishes under spBv1.0/.
--
-- Keyed by the Sparkplug identity (group, edge node, device; '' for the edge node's own
-- metrics), not by iothub's source or serial, so a renamed source or serial template keeps them.
-- IF NOT EXISTS: a rerun is harmless.

CREATE TABLE IF NOT EXISTS sparkplug_aliases (
    group_id     text NOT NULL,
    edge_node_id text NOT NULL,
    device_id    text NOT NULL,                       -- '' for NBIRTH (the edge node itself)
    metric_name  text NOT NULL,
    alias        numeric(20, 0) CHECK (alias >= 0),   -- uint64 on the wire; NULL: no alias
    datatype     integer NOT NULL,                    -- Sparkplug datatype (1 Int8 ... 34)
    serial_id    varchar(255) NOT NULL,               -- the iothub device the birth was for
    born_at      timestamptz NOT NULL DEFAULT now(),  -- when iothub stored the birth
    PRIMARY KEY (group_id, edge_node_id, device_id, metric_name)
);

CREATE UNIQUE INDEX IF NOT EXISTS sparkplug_aliases_alias
    ON sparkplug_aliases (group_id, edge_node_id, device_id, alias) WHERE alias IS NOT NULL;
