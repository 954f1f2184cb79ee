-- retl.run: the one way to start a run by hand (and from dbt post-hooks).

CREATE FUNCTION retl.run(sync text, wait boolean DEFAULT false, timeout interval DEFAULT NULL,
                         allow_mass_delete boolean DEFAULT false, allow_schema_change boolean DEFAULT false)
RETURNS retl.runs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r retl.runs;
    run_id bigint;
    timeout_ms bigint;
BEGIN
    PERFORM retl._check_worker_database();
    IF NOT wait THEN
        IF timeout IS NOT NULL THEN
            RAISE EXCEPTION 'retl.run: timeout needs wait => true' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- The run row commits with the caller's transaction; the worker is woken at commit.
        r := retl._queue_run(sync, 'manual', allow_mass_delete, allow_schema_change);
        PERFORM retl._wake_worker_at_commit();
        RETURN r;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'retl.run(wait => true) needs the READ COMMITTED isolation level'
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    DETAIL = format('This transaction is %s, so it could not see the finished run.', current_setting('transaction_isolation'));
    END IF;
    IF timeout IS NOT NULL THEN
        IF timeout <= interval '0' THEN
            RAISE EXCEPTION 'retl.run: timeout must be positive, got %', timeout USING ERRCODE = 'invalid_parameter_value';
        END IF;
        timeout_ms := ceil(extract(epoch FROM timeout) * 1000)::bigint;
    END IF;
    -- The worker creates and commits the run row itself, so it can finish while we wait.
    run_id := retl._await_run(retl._runnable_sync(sync), timeout_ms, coalesce(allow_mass_delete, false),
                              coalesce(allow_schema_change, false));
    -- A new statement, so a new snapshot: it sees the run the worker committed meanwhile.
    r := retl._run_summary(run_id);
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'run % of sync % is gone: the sync was dropped while it ran', run_id, retl._q(sync)
              USING ERRCODE = 'undefined_object';
    END IF;
    -- A failed run fails the caller (a dbt post-hook fails its model); partial runs (some rows
    -- rejected, listed in retl.row_errors) do not.
    IF r.status = 'failed' THEN
        RAISE EXCEPTION 'run % of sync % failed: %', r.id, retl._q(sync), coalesce(r.error, 'no error recorded')
              USING ERRCODE = 'external_routine_exception',
                    DETAIL = format('planned %s, delivered %s, rejected %s, %s API calls',
                                    r.planned_inserts + r.planned_updates + r.planned_deletes, r.delivered, r.failed, r.api_calls),
                    HINT = 'See SELECT * FROM retl.runs WHERE id = ' || r.id || ' and retl.batches for that run.';
    ELSIF r.status = 'cancelled' THEN
        RAISE EXCEPTION 'run % of sync % was cancelled: %', r.id, retl._q(sync), coalesce(r.error, 'no reason recorded')
              USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN r;
END $$;
COMMENT ON FUNCTION retl.run(text, boolean, interval, boolean, boolean) IS
  'Run a sync. wait => false (default): queue the run; the worker starts it when this transaction commits; returns the queued run. wait => true: the worker runs it now and this call returns the finished run, or raises if it failed (SQLSTATE 38000) or did not finish within timeout (57014; the run goes on). The sync itself must be committed. allow_mass_delete => true lets this run pass the mass-delete guard (max_delete_percent, max_delete_rows, an empty model); allow_schema_change => true accepts a mapped column that changed type or disappeared since the last successful run.';
