-- retl.run: the one way to start a run by hand (and from dbt post-hooks).

CREATE FUNCTION retl.run(sync text, wait boolean DEFAULT false) RETURNS retl.runs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r retl.runs;
    run_id bigint;
BEGIN
    PERFORM retl._check_worker_database();
    IF NOT wait THEN
        -- The run row commits with the caller's transaction; the worker is woken at commit.
        r := retl._queue_run(sync, 'manual');
        PERFORM retl._wake_worker_at_commit();
        RETURN r;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'retl.run(wait => true) needs the READ COMMITTED isolation level'
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    DETAIL = format('This transaction is %s, so it could not see the finished run.', current_setting('transaction_isolation'));
    END IF;
    -- The worker creates and commits the run row itself, so it can finish while we wait.
    run_id := retl._run_and_wait(retl._runnable_sync(sync), 'manual');
    -- A new statement, so a new snapshot: it sees the run the worker committed meanwhile.
    RETURN retl._run_summary(run_id);
END $$;
COMMENT ON FUNCTION retl.run(text, boolean) IS
  'Run a sync. wait => false (default): queue the run; the worker starts it when this transaction commits; returns the queued run. wait => true: the worker runs it now and this call returns the finished run (the sync itself must be committed).';
