-- The start of each client key as shown at creation ("cgk-" and 8 more characters), for key listings;
-- NULL for keys made before it. The key itself is never stored.
ALTER TABLE api_keys ADD COLUMN display_prefix text;
