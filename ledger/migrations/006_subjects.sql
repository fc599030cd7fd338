-- Context types: an execution is about a subject of some type (a contact, an
-- opportunity, ...), not only a contact. Existing rows are about contacts.
-- ADD COLUMN with a constant default rewrites no rows.
ALTER TABLE ordo.executions RENAME COLUMN contact_id TO subject_id;
ALTER TABLE ordo.executions RENAME COLUMN contact TO subject;
ALTER TABLE ordo.executions ADD COLUMN subject_type text NOT NULL DEFAULT 'contact';
DROP INDEX ordo.executions_by_contact;
CREATE INDEX executions_by_subject ON ordo.executions (tenant, subject_type, subject_id);

-- An event wakes an execution waiting for it about the same subject: the same
-- type and id (an opportunity's event never wakes a contact's execution that
-- happens to have the same id).
ALTER TABLE ordo.event_waits RENAME COLUMN contact_id TO subject_id;
ALTER TABLE ordo.event_waits ADD COLUMN subject_type text NOT NULL DEFAULT 'contact';
DROP INDEX ordo.event_waits_by_contact;
CREATE INDEX event_waits_by_subject ON ordo.event_waits (tenant, subject_type, subject_id, event_type);
