package main

// database.go connects to PostgreSQL: the pool and its settings, the checks
// every new connection passes, waiting for the database at start-up, and
// applying schema.sql.

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// connectDB retries for STARTUP_TIMEOUT, so the service may start before its
// database (as in docker compose), then gives up with the address it tried.
func connectDB(ctx context.Context, cfg config, log *slog.Logger) (*pgxpool.Pool, error) {
	pcfg, err := poolConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	where := fmt.Sprintf("%s:%d/%s", pcfg.ConnConfig.Host, pcfg.ConnConfig.Port, pcfg.ConnConfig.Database)
	db, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", where, err)
	}
	deadline := time.Now().Add(cfg.StartupTimeout)
	err = retry(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		return db.Ping(ctx)
	}, func(err error, wait time.Duration) bool {
		if refusedForGood(err) || time.Now().After(deadline) {
			return false
		}
		log.Warn("database not reachable yet, retrying", "addr", where, "err", err, "retry_in", wait)
		return true
	})
	switch {
	case err == nil:
		log.Info("database connected", "addr", where)
		return db, nil
	case errors.Is(err, errServerTooOld):
		err = fmt.Errorf("database %s: %w", where, err)
	case refusedForGood(err):
		err = fmt.Errorf("database %s refused the connection: %s", where, oneLine(err))
	default:
		err = fmt.Errorf("database %s unreachable after %s: %s", where, cfg.StartupTimeout, oneLine(err))
	}
	db.Close()
	return nil, err
}

// poolConfig is DATABASE_URL with the settings the service needs where the
// URL does not say otherwise.
func poolConfig(databaseURL string) (*pgxpool.Config, error) {
	pcfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	if pcfg.ConnConfig.ConnectTimeout == 0 || pcfg.ConnConfig.ConnectTimeout > 3*time.Second {
		// Requests must fail fast while the database is down, not hang.
		pcfg.ConnConfig.ConnectTimeout = 3 * time.Second
	}
	pcfg.ConnConfig.OnPgError = closeReadOnly
	if _, ok := pcfg.ConnConfig.RuntimeParams["timezone"]; !ok {
		// Times the server formats, such as the pay-order event's
		// created_at (queueInsertOrders), are in UTC like the API's.
		pcfg.ConnConfig.RuntimeParams["timezone"] = "UTC"
	}
	pcfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		if err := checkServerVersion(c.PgConn()); err != nil {
			return err
		}
		p, err := getServerProcess(ctx, c)
		if err != nil {
			return err
		}
		c.PgConn().CustomData()[serverProcessKey] = p
		return nil
	}
	if !strings.Contains(databaseURL, "pool_max_conns") {
		// pgxpool's default is max(4, CPUs): too few for the order
		// writers, the relay, the consumer and reads at once.
		pcfg.MaxConns = 16
	}
	return pcfg, nil
}

// refusedForGood is a connection refused for a reason that will not fix
// itself while start-up waits: a wrong role, password or database name, or a
// server too old to settle a lost commit.
func refusedForGood(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "28") || pgErr.Code == "3D000") ||
		errors.Is(err, errServerTooOld)
}

// oneLine flattens an error for a one-line exit message: pgx lists every
// address it tried on lines of their own.
func oneLine(err error) string {
	var b strings.Builder
	for _, line := range strings.Split(err.Error(), "\n") {
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		if b.Len() > 0 {
			if strings.HasSuffix(b.String(), ":") {
				b.WriteString(" ")
			} else {
				b.WriteString("; ")
			}
		}
		b.WriteString(line)
	}
	return b.String()
}

// closeReadOnly is the pool's OnPgError: a connection whose server refuses
// writes (25006) is closed, since that server stays read-only for it; the
// pool's next connection may reach the new primary (a multi-host
// DATABASE_URL with target_session_attrs=read-write picks it). FATAL errors
// close the connection as pgx's default handler does.
func closeReadOnly(_ *pgconn.PgConn, pgErr *pgconn.PgError) bool {
	return pgErr.Code != sqlstateReadOnly && !strings.EqualFold(pgErr.Severity, "FATAL")
}

// checkServerVersion refuses a server older than 14 by the server_version it
// reported when the connection started. A version it cannot read (a fork's
// own format) is let through: the settle itself would then tell.
func checkServerVersion(c *pgconn.PgConn) error {
	v := c.ParameterStatus("server_version")
	digits := strings.IndexFunc(v, func(r rune) bool { return r < '0' || r > '9' })
	if digits < 0 {
		digits = len(v)
	}
	major, err := strconv.Atoi(v[:digits])
	if err != nil || major >= 14 {
		return nil
	}
	return fmt.Errorf("%w; the server is PostgreSQL %s", errServerTooOld, v)
}

var (
	//go:embed upgrade.sql
	upgradeSQL string
	//go:embed schema.sql
	schemaSQL string
)

// applySchema runs upgrade.sql, which brings a database of an earlier version
// to this one's shape, then schema.sql. Two replicas starting at once would
// race on CREATE ... IF NOT EXISTS (it is not atomic with respect to the
// catalog), so the transaction first takes an advisory lock.
func applySchema(ctx context.Context, db *pgxpool.Pool) error {
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('order-service schema'))`); err != nil {
			return fmt.Errorf("lock schema: %w", err)
		}
		if _, err := tx.Exec(ctx, upgradeSQL); err != nil {
			return fmt.Errorf("apply upgrade.sql: %w", err)
		}
		if _, err := tx.Exec(ctx, schemaSQL); err != nil {
			return fmt.Errorf("apply schema.sql: %w", err)
		}
		return nil
	})
}
