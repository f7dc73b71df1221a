"""Grid signals: carbon intensity and electricity price sources, fallback chains, lookup by time."""
