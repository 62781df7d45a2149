package main

// dberrors.go classifies every database error once: transient (the
// database's weather: retry, or answer 503), permanent (the values written
// cannot be stored), or a bug.

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// errReadOnly is a database that takes no writes: a standby, or a primary
// demoted during a failover.
var errReadOnly = errors.New("the database is read-only")

// sqlstateReadOnly is read_only_sql_transaction: the server takes no writes
// (a standby, or a primary demoted during a failover).
const sqlstateReadOnly = "25006"

// dbReadOnly: the database refused a write because it takes none.
func dbReadOnly(err error) bool {
	var pgErr *pgconn.PgError
	return errors.Is(err, errReadOnly) || errors.As(err, &pgErr) && pgErr.Code == sqlstateReadOnly
}

// errServerTooOld is a PostgreSQL older than 14. Settling a commit whose
// answer was lost waits for the server process it ends (endBackend), and
// pg_terminate_backend takes that wait only since 14; on an older server the
// settle would fail, and every such order be answered "outcome unknown".
// Start-up stops on it; later (a failover to an old standby, say) it is the
// database being unavailable, like errReadOnly: 503, not 500.
var errServerTooOld = errors.New("PostgreSQL 14 or newer is needed")

// Every database error is classified once, here. Transient: the same work may
// succeed later, so the consumer and the relay retry it and HTTP answers 503
// with Retry-After. Permanent: the values themselves cannot be stored, so a
// payment result goes to the DLQ. Anything else is a bug.
// SQLSTATE classes: https://www.postgresql.org/docs/current/errcodes-appendix.html
func dbTransient(err error) bool {
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		// Whatever the server said (too many clients, the database not
		// accepting connections now: 55000, shutting down), a connection
		// it refuses is its weather.
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "40001", // serialization_failure
			"40P01", // deadlock_detected
			"55P03", // lock_not_available
			"55006", // object_in_use
			sqlstateReadOnly,
			"25P03", // idle_in_transaction_session_timeout
			"58000", // system_error
			"58030": // io_error
			return true
		}
		switch pgErr.Code[:2] {
		case "08", // connection_exception
			"53", // insufficient_resources: too many connections, disk full, out of memory
			"57": // operator_intervention: shutdown, cannot connect now, query canceled
			return true
		}
		return false
	}
	var netErr net.Error
	return errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err) || pgconn.SafeToRetry(err) ||
		errors.As(err, &netErr) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, pgconn.ErrConnClosed) || errors.Is(err, errReadOnly) ||
		errors.Is(err, errServerTooOld) || errors.Is(err, errCommitOutcomeUnknown) || errors.Is(err, errNotWritten)
}

// dbPermanent is an error caused by the values written: class 22 (data
// exception: bad text, a value out of range) or 23 (integrity constraint).
func dbPermanent(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "22") || strings.HasPrefix(pgErr.Code, "23"))
}

// errNotWritten: the transaction of a commit whose answer was lost did not
// store this order; a retry is safe.
var errNotWritten = errors.New("the order was not stored: its transaction rolled back")

// errCommitOutcomeUnknown: a COMMIT went unanswered and the database could not
// be asked in time whether it happened.
var errCommitOutcomeUnknown = errors.New("the outcome of the commit is unknown")
