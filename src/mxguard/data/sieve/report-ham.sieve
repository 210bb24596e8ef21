# mxguard: a message copied or moved OUT of the Junk folder is ham, unless it
# goes to the Trash (deleting spam is no verdict on it).
# Run by Dovecot's IMAPSieve (imapsieve_mailbox2_* in 90-mxguard-imapsieve.conf);
# it hands the message to the mxguard-learn-ham program.
# Written by `mxguard learn dovecot-setup`.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string :is "${mailbox}" "@TRASH@" {
  stop;
}
pipe :copy "mxguard-learn-ham";
